"""Mathematical properties of the core, with hypothesis-drawn shapes and data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import bnjax

# Few examples and small shapes: each new shape compiles once; eager runs are fast.
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def batches(draw, min_n=2):
    n = draw(st.integers(min_n, 7))
    length = draw(st.integers(1, 4))
    c = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    loc = draw(st.floats(-50, 50))
    scale = draw(st.floats(0.1, 20))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, length, c)) * scale + loc).astype(np.float32)
    return x, rng


@SETTINGS
@given(batches(), st.sampled_from([1e-5, 1e-3, 0.1]))
def test_train_output_is_standardized(batch, eps):
    """Per feature: mean ~ 0 and biased var ~ var / (var + eps), without affine.

    Up to float32's rounding of `x - mean`: each difference is off by up to an ulp of
    the largest |x|, `u` in units of the output. It matters when the batch's spread is
    tiny next to its mean (two close samples around 50): then `y` is mostly rounding.
    """
    x, _ = batch
    y, _ = bnjax.apply({}, {}, x, True, eps=eps)
    y = np.asarray(y, np.float64)
    var = np.var(x.astype(np.float64), axis=(0, 1))
    expected = var / (var + eps)
    u = np.abs(x).max(axis=(0, 1)) * 2.0**-23 / np.sqrt(var + eps)
    np.testing.assert_array_less(np.abs(y.mean(axis=(0, 1))), 1e-4 + 4 * u)
    err = np.abs(y.var(axis=(0, 1)) - expected)
    np.testing.assert_array_less(err, 1e-3 * expected + 1e-4 + 8 * u * np.sqrt(expected) + 4 * u**2)


@SETTINGS
@given(batches(), st.integers(1, 6))
def test_eval_output_is_independent_of_the_rest_of_the_batch(batch, k):
    """In eval mode an example's output is the same alone or in any batch."""
    x, rng = batch
    c = x.shape[-1]
    params = {
        "weight": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
    }
    stats = {
        "running_mean": jnp.asarray(rng.normal(size=c), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.1, 3, c), jnp.float32),
        "num_batches_tracked": jnp.asarray(3, jnp.int32),
    }
    y, _ = bnjax.apply(params, stats, x, False)
    i = k % x.shape[0]
    alone, _ = bnjax.apply(params, stats, x[i : i + 1], False)
    other = (rng.normal(size=(k,) + x.shape[1:]) * 100).astype(np.float32)
    mixed, _ = bnjax.apply(params, stats, np.concatenate([other, x[i : i + 1]]), False)
    np.testing.assert_allclose(alone[0], y[i], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[-1], y[i], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(batches(), st.booleans())
def test_outputs_are_permutation_equivariant(batch, train):
    """Permuting the batch permutes the outputs and leaves the statistics alone."""
    x, rng = batch
    params, stats = bnjax.init(x.shape[-1])
    perm = rng.permutation(x.shape[0])
    y, s = bnjax.apply(params, stats, x, train)
    y_p, s_p = bnjax.apply(params, stats, x[perm], train)
    np.testing.assert_allclose(y_p, np.asarray(y)[perm], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s, s_p)
