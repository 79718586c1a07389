"""Ghost batches shape training statistics only: evaluation takes any batch size.

With running statistics, evaluation normalizes every row with the same per-feature
numbers, so `virtual_batch_size` has nothing to cut (Keras accepts any batch there).
A batch of 10 with `virtual_batch_size=4` evaluates to exactly what plain
evaluation gives; training, and evaluation without running statistics (which uses
batch statistics, so ghosts), keep the error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import ref_batchnorm

import bnjax

N, C, V = 10, 3, 4  # 10 is not a multiple of 4


def _trained_stats():
    rng = np.random.default_rng(0)
    params = {
        "weight": jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=C), jnp.float32),
    }
    stats = {
        "running_mean": jnp.asarray(rng.normal(size=C), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32),
        "num_batches_tracked": jnp.asarray(7, jnp.int32),
    }
    return params, stats


def _x(shape=(N, C)):
    return jnp.asarray(np.random.default_rng(1).normal(size=shape) * 2 + 1, jnp.float32)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape,axis", [((N, C), -1), ((N, C, 5), 1), ((N, 2, 2, C), -1)])
def test_core_eval_on_a_non_divisible_batch_is_plain_eval(jit, shape, axis):
    params, stats = _trained_stats()
    x = _x(shape)

    def run(vbs):
        def f(x):
            return bnjax.apply(params, stats, x, False, axis=axis, virtual_batch_size=vbs)

        return (jax.jit(f) if jit else f)(x)

    (y, new), (y0, new0) = run(V), run(None)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    jax.tree.map(np.testing.assert_array_equal, new, new0)
    jax.tree.map(np.testing.assert_array_equal, new, stats)  # eval changes nothing
    # And both are eval mode's numbers (float64 reference).
    expected, _ = ref_batchnorm(
        x,
        np.asarray(params["weight"]),
        np.asarray(params["bias"]),
        jax.tree.map(np.asarray, stats),
        train=False,
        axes=(axis,),
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_training_and_batch_statistics_in_eval_keep_the_error():
    params, stats = _trained_stats()
    with pytest.raises(ValueError, match=r"batch 10\) is not divisible by virtual_batch_size=4"):
        bnjax.apply(params, stats, _x(), True, virtual_batch_size=V)
    # Without running statistics, eval normalizes with batch statistics: ghosts apply.
    with pytest.raises(ValueError, match="not divisible"):
        bnjax.apply(params, {}, _x(), False, virtual_batch_size=V)
    # A bad value is still an error in eval.
    with pytest.raises(ValueError, match="must be a positive int"):
        bnjax.apply(params, stats, _x(), False, virtual_batch_size=0)


def test_linen_eval_on_a_non_divisible_batch():
    pytest.importorskip("flax.linen")
    import bnjax.linen

    params, stats = _trained_stats()
    variables = {
        "params": {k: params[k] for k in ("weight", "bias")},
        "batch_stats": stats,
    }
    ghost = bnjax.linen.BatchNorm(virtual_batch_size=V)
    plain = bnjax.linen.BatchNorm()
    y = ghost.apply(variables, _x(), train=False)
    y0 = plain.apply(variables, _x(), train=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    with pytest.raises(ValueError, match="not divisible"):
        ghost.apply(variables, _x(), train=True, mutable=["batch_stats"])


def test_nnx_eval_on_a_non_divisible_batch():
    pytest.importorskip("flax.nnx")
    from flax import nnx

    import bnjax.nnx

    params, stats = _trained_stats()
    ghost = bnjax.nnx.BatchNorm(C, virtual_batch_size=V)
    plain = bnjax.nnx.BatchNorm(C)
    for bn in (ghost, plain):
        bn.weight[...], bn.bias[...] = params["weight"], params["bias"]
        bn.running_mean[...], bn.running_var[...] = stats["running_mean"], stats["running_var"]
        bn.eval()
    call = nnx.jit(lambda m, x: m(x))
    y, y0 = call(ghost, _x()), call(plain, _x())
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    ghost.train()
    with pytest.raises(ValueError, match="not divisible"):
        ghost(_x())
