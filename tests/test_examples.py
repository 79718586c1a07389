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


def test_port_resnet_matches_pytorch_from_the_committed_fixture():
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
