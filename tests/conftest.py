"""Shared test helpers (importable as `from conftest import ...`: the tests directory
is on `sys.path` under pytest's default import mode).

Key names and the "is this a BatchNorm's statistics" rule come from the package's
one home for them, `bnjax._core.conventions`, re-exported here for the tests.

The helpers do not reuse `bnjax.testing`'s public names, which mean something else:
`fixture_arrays(name)` is a committed fixture's raw arrays (skipping when the file is
absent), where `bnjax.testing.load_fixture(path)` reads an `export_fixture` file into a
`Fixture`; `assert_leaves_close` is a plain leaf-by-leaf `assert_allclose` (positional
tolerances, 1e-6 by default), where `bnjax.testing.assert_trees_close` compares
structures too and reports every leaf's worst element. Tests that mean the public
helpers call them as `testing.load_fixture` / `testing.assert_trees_close`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax._core.conventions import PARAM_KEYS, STAT_KEYS, is_batch_stats, to_plain_dict

__all__ = [
    "FIXTURES",
    "HI",
    "PARAM_KEYS",
    "STAT_KEYS",
    "assert_leaves_close",
    "assert_state_dict_close",
    "drifting_batch",
    "fixture_arrays",
    "fixture_state_dict",
    "is_batch_stats",
    "to_plain_dict",
]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HI = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: the tolerances are float32's


def fixture_arrays(name: str) -> dict[str, np.ndarray]:
    """A PyTorch fixture's arrays; skips the test when the file is absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"PyTorch fixture {path} not found (scripts/export_torch_fixtures.py)")
    return dict(np.load(path))


def fixture_state_dict(fx: dict, prefix: str, index: int | None = None) -> dict:
    """The torch state_dict stored in a fixture under `prefix/<key>` (step `index`)."""
    sd = {}
    for key, value in fx.items():
        if key.startswith(prefix + "/"):
            sd[key[len(prefix) + 1 :]] = value if index is None else value[index]
    return sd


def assert_state_dict_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    """Same keys; counts equal exactly, every other entry within tolerance."""
    assert sorted(actual) == sorted(expected)
    for key in expected:
        if key.endswith("num_batches_tracked"):
            assert int(actual[key]) == int(expected[key]), key
        else:
            np.testing.assert_allclose(actual[key], expected[key], rtol, atol, err_msg=key)


def assert_leaves_close(actual, expected, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Leaf by leaf `assert_allclose` of two trees of the same structure."""
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol, atol),
        actual,
        expected,
    )


def drifting_batch(rng: np.random.Generator, shape: tuple[int, ...], step: int) -> jax.Array:
    """A float32 batch whose mean and scale change from step to step (not 0 and 1)."""
    return jnp.asarray(rng.normal(size=shape) * (1.0 + 0.5 * step) + 2.0 - step, jnp.float32)
