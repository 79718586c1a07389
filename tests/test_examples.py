"""The README's main job runs end to end and learns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_reaches_95_percent():
    accuracy = _load("train_digits").main([])
    assert accuracy >= 0.95


def test_data_parallel_example_on_two_processes():
    """`data_parallel.py --processes 2`: 2 local processes, one JAX runtime, match 1 device."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own devices
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "data_parallel.py"), "--processes", "2", "--epochs", "1",
         "--batch-size", "128", "--no-local-bn", "--timeout", "240"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x 4 devices" in out, out
    for run in ("shard_map + axis_name", "jit + NamedSharding"):
        line = next(line for line in out.splitlines() if line.strip().startswith(run))
        assert line.endswith("ok"), line
