"""The README's main job runs end to end and learns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import doc_figures
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # over 20 s on 2 cores
def test_train_digits_reaches_95_percent(capsys):
    accuracy = _load("train_digits").main([])
    assert accuracy >= 0.95
    doc_figures.check("python examples/train_digits.py", capsys.readouterr().out)  # README


@pytest.mark.slow  # over 20 s on 2 cores
def test_data_parallel_example_on_two_processes():
    """`data_parallel.py --processes 2`: 2 local processes, one JAX runtime, match 1 device."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own devices
    command = (
        "python examples/data_parallel.py --processes 2 --epochs 1 --batch-size 128 --no-local-bn"
    )
    proc = subprocess.run(
        [sys.executable, *command.split()[1:], "--timeout", "240"],
        cwd=EXAMPLES.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x 4 devices" in out, out
    for run in ("shard_map + axis_name", "jit + NamedSharding"):
        line = next(line for line in out.splitlines() if line.strip().startswith(run))
        assert line.endswith("ok"), line
    doc_figures.check(command, out)  # docs/scaling.md, section 7


@pytest.mark.slow  # over 20 s on 2 cores
def test_port_resnet_matches_pytorch_from_the_committed_fixture(capsys):
    import sys

    # Flax modules are dataclasses: their module must be importable by name.
    spec = importlib.util.spec_from_file_location("port_resnet", EXAMPLES / "port_resnet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["port_resnet"] = module
    try:
        spec.loader.exec_module(module)
        diffs = module.main(["--fixture"])
    finally:
        del sys.modules["port_resnet"]
    assert diffs["eval"] < 1e-5 and diffs["state"] < 1e-5
    assert diffs["grads"] < 5e-4 and diffs["steps"] < 5e-4  # see tests/test_port_models.py
    # docs/pytorch_interop.md quotes what it prints
    doc_figures.check("python examples/port_resnet.py --fixture", capsys.readouterr().out)
