"""Keras presets: `bnjax.Renorm.keras()` is Keras's `renorm=True`, and the moving
variance convention of Keras's fused and unfused layers.

Expected numbers come from the Keras fixtures (`scripts/export_keras_fixtures.py`,
tf_keras 2.21 on TensorFlow's CPU build): `renorm_keras_defaults_2d` is
`BatchNormalization(renorm=True)` with no `renorm_clipping` and the default
`renorm_momentum=0.99`, on inputs where `Renorm()`'s own clipping (rmax 3, dmax 5)
would bind; `fused_4d` is Keras's default fused layer on a 4D input.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from keras_oracle import F32, check_against_keras, load, replay, settings, unclipped_corrections

import bnjax


def test_renorm_keras_is_keras_renorm_true_as_it_comes():
    arrays, meta = load("renorm_keras_defaults_2d")
    assert "renorm_clipping" not in meta["keras_kwargs"]
    assert "renorm_momentum" not in meta["keras_kwargs"]
    assert settings(meta)["renorm"] == bnjax.Renorm.keras()
    check_against_keras("renorm_keras_defaults_2d")
    check_against_keras("renorm_keras_defaults_2d", jit=False)


def test_the_paper_default_renorm_is_not_keras_default():
    """`Renorm()` clips at rmax 3 / dmax 5; Keras's `renorm=True` clips nothing."""
    arrays, meta = load("renorm_keras_defaults_2d")
    r_d = unclipped_corrections(arrays, meta)
    # The fixture's data would hit Renorm()'s bounds: r outside [1/3, 3] or |d| > 5.
    assert any(np.any((r > 3) | (r < 1 / 3) | (np.abs(d) > 5)) for r, d in r_d)
    opts = dict(settings(meta), renorm=bnjax.Renorm())  # the paper's clipping, the default
    params = {"weight": jnp.asarray(arrays["gamma"]), "bias": jnp.asarray(arrays["beta"])}
    _, stats = bnjax.init(arrays["gamma"].shape[0], renorm=True)
    y, _ = bnjax.apply(params, stats, jnp.asarray(arrays["x_0"]), True, **opts)
    assert not np.allclose(np.asarray(y), arrays["y_0"], rtol=1e-3, atol=1e-3)
    chex.assert_trees_all_close(replay(arrays, meta)[0]["y"], arrays["y_0"], **F32)


def test_fused_keras_stores_the_unbiased_variance_which_is_bnjax_running_var():
    """Keras's default fused 4D layer keeps an EMA of the *unbiased* batch variance:
    bnjax's `running_var` from the same start (1), with no n / (n - 1) conversion."""
    arrays, meta = load("fused_4d")
    assert meta["keras_kwargs"]["fused"] is True
    opts = settings(meta)
    c = arrays["gamma"].shape[0]
    params = {"weight": jnp.asarray(arrays["gamma"]), "bias": jnp.asarray(arrays["beta"])}
    _, stats = bnjax.init(c)
    step = jax.jit(lambda s, x: bnjax.apply(params, s, x, True, **opts))
    biased = np.ones(c)
    for t in range(meta["steps"]):
        x = arrays[f"x_{t}"]
        y, stats = step(stats, jnp.asarray(x))
        chex.assert_trees_all_close(np.asarray(y), arrays[f"y_{t}"], **F32)
        chex.assert_trees_all_close(stats["running_mean"], arrays[f"moving_mean_{t}"], **F32)
        chex.assert_trees_all_close(stats["running_var"], arrays[f"moving_variance_{t}"], **F32)
        m = opts["momentum"]
        biased = (1 - m) * biased + m * x.reshape(-1, c).astype(np.float64).var(0)
    # The unfused convention (biased EMA) is measurably not what the fused layer keeps.
    assert not np.allclose(biased, arrays[f"moving_variance_{meta['steps'] - 1}"], rtol=1e-3)


def test_renorm_keras_arguments():
    assert bnjax.Renorm.keras() == bnjax.Renorm(rmax=None, dmax=None, momentum=0.01, rmin=None)
    # Keras: a missing rmin is no lower bound (bnjax's rmin=None would mean 1 / rmax).
    assert bnjax.Renorm.keras({"rmax": 3.0}).rmin == 0.0
    assert bnjax.Renorm.keras({"rmax": 3.0, "rmin": 0.5}, 0.9) == bnjax.Renorm(
        rmax=3.0, dmax=None, momentum=0.1, rmin=0.5
    )
    with pytest.raises(ValueError, match=r"'rmax', 'rmin' and 'dmax'.*\['r_max'\]"):
        bnjax.Renorm.keras({"r_max": 3.0})
    with pytest.raises(ValueError, match="renorm_momentum is Keras's"):
        bnjax.Renorm.keras(renorm_momentum=1.5)


def test_renorm_keras_unclipped_is_exactly_unclipped():
    """No bound at all: r and d are the raw ratios (closed form, float64)."""
    arrays, meta = load("renorm_keras_defaults_2d")
    x = jnp.asarray(arrays["x_0"])
    c = x.shape[-1]
    params, stats = bnjax.init(c, renorm=True)
    y, _ = bnjax.apply(params, stats, x, True, eps=1e-3, renorm=bnjax.Renorm.keras())
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(0), x64.var(0)
    sigma_b = np.sqrt(var + 1e-3)
    r, d = sigma_b / 1.0, (mean - 0.0) / 1.0  # renorm statistics at their start (0, 1)
    expected = (x64 - mean) / sigma_b * r + d
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4)
