"""Masks to the SPEC: broadcastable shapes, and padding that never reaches statistics
or gradients, whatever it holds (NaN, inf).

Expected values: the float64 reference (`reference.py`) on the counted rows, and
the property that NaN / inf padding gives exactly what zero padding gives.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import ref_batchnorm

import bnjax

N, L, C = 4, 5, 3
LENGTHS = np.array([5, 3, 1, 4])
MASK = jnp.asarray(np.arange(L)[None, :] < LENGTHS[:, None])  # (N, L)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(N, L, C)) * 2 + 1, jnp.float32)
G = jnp.asarray(RNG.normal(size=(N, L, C)), jnp.float32)  # a fixed upstream gradient


def _padded(fill):
    return jnp.where(MASK[..., None], X, jnp.asarray(fill, jnp.float32))


def _params_stats():
    params = {"weight": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])}
    stats = {
        "running_mean": jnp.array([0.5, -1.0, 0.0]),
        "running_var": jnp.array([1.5, 0.5, 2.0]),
        "num_batches_tracked": jnp.asarray(3, jnp.int32),
    }
    return params, stats


@jax.jit
def _step(params, stats, x, mask):
    """Outputs, new statistics, and grads of a loss that ignores masked-out outputs."""

    def loss(params, x):
        y, new = bnjax.apply(params, stats, x, True, momentum=0.2, mask=mask)
        return jnp.sum(jnp.where(mask[..., None], y * G, 0.0)), (y, new)

    (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new, gp, gx


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf, 1e30])
def test_nan_and_inf_padding_equal_zero_padding(fill):
    params, stats = _params_stats()
    zero = _step(params, stats, _padded(0.0), MASK)
    got = _step(params, stats, _padded(fill), MASK)
    m = np.asarray(MASK)
    for a in (got[0], got[3]):  # outputs and x-gradients at counted positions
        assert np.all(np.isfinite(np.asarray(a)[m]))
    np.testing.assert_array_equal(np.asarray(got[0])[m], np.asarray(zero[0])[m])
    np.testing.assert_array_equal(np.asarray(got[3])[m], np.asarray(zero[3])[m])
    chex.assert_trees_all_equal(got[1], zero[1])  # running statistics
    chex.assert_trees_all_equal(got[2], zero[2])  # parameter gradients
    # ... and the statistics are the counted rows' (float64 reference).
    np_stats = jax.tree.map(np.asarray, stats)
    _, ref = ref_batchnorm(
        X, params["weight"], params["bias"], np_stats, train=True, momentum=0.2, mask=m
    )
    np.testing.assert_allclose(got[1]["running_mean"], ref["running_mean"], rtol=1e-6)
    np.testing.assert_allclose(got[1]["running_var"], ref["running_var"], rtol=1e-6)


def test_masked_out_finite_padding_is_still_normalized():
    """SPEC: masked-out outputs are still computed (with the counted statistics)."""
    params, stats = _params_stats()
    x = _padded(7.0)
    y, _, _, _ = _step(params, stats, x, MASK)
    mean, var = _batch_moments(np.asarray(X, np.float64)[np.asarray(MASK)])
    expected = (7.0 - mean) / np.sqrt(var + 1e-5) * params["weight"] + params["bias"]
    np.testing.assert_allclose(
        np.asarray(y)[~np.asarray(MASK)],
        np.broadcast_to(expected, ((~np.asarray(MASK)).sum(), C)),
        rtol=1e-5,
        atol=1e-5,
    )


def _batch_moments(rows):
    return rows.mean(0), rows.var(0)


def test_a_broadcastable_mask_drops_whole_samples():
    """`(N, 1)` against `(N, L)`: the kept samples' every position counts."""
    params, stats = _params_stats()
    keep = jnp.array([[True], [False], [True], [True]])
    x = X.at[1].set(jnp.nan)  # a dropped sample may hold anything
    y, new = bnjax.apply(params, stats, x, True, momentum=0.2, mask=keep)
    full_mask = np.broadcast_to(np.asarray(keep), (N, L))
    _, ref = ref_batchnorm(
        X,
        params["weight"],
        params["bias"],
        jax.tree.map(np.asarray, stats),
        train=True,
        momentum=0.2,
        mask=full_mask,
    )
    np.testing.assert_allclose(new["running_var"], ref["running_var"], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(y)[full_mask]))
    # The same through the Flax module.
    import bnjax.linen as bl

    bn = bl.BatchNorm(momentum=0.2)
    variables = bn.init(jax.random.key(0), x, train=False)
    _, upd = bn.apply(
        {"params": params, "batch_stats": stats},
        x,
        train=True,
        mask=keep,
        mutable=["batch_stats"],
    )
    chex.assert_trees_all_close(upd["batch_stats"], new)
    del variables


@pytest.mark.parametrize("shape", [(N, L, 1), (2, L), (N, L + 1)])
def test_masks_that_do_not_broadcast_are_refused(shape):
    before = np.asarray(X)
    with pytest.raises(ValueError, match=r"mask.*\(4, 5\).*broadcast"):
        bnjax.apply({}, {}, X, True, mask=jnp.ones(shape, bool))
    np.testing.assert_array_equal(X, before)
    if shape == (N, L, 1):  # Flax's x-ranked mask: the message says how to drop the axis
        with pytest.raises(ValueError, match=r"jnp\.squeeze\(mask, 2\)"):
            bnjax.apply({}, {}, X, True, mask=jnp.ones(shape, bool))
