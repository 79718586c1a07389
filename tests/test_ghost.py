"""Ghost batches (`virtual_batch_size`) against Keras, against per-sub-batch BatchNorm.

Expected numbers come from the Keras fixtures (converted in `keras_oracle.py`: Keras's
ghosts are strided rows, bnjax's contiguous ones; biased vs unbiased variance; momentum
`1 - m`), from plain BatchNorm run on each sub-batch (a ghost batch *is* a batch of its
own), and from NumPy float64 closed forms for the running statistics.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from keras_oracle import F32, check_against_keras

import bnjax
import bnjax.linen


@pytest.mark.parametrize("name", ["ghost_2d", "ghost_4d", "ghost_renorm_4d"])
def test_equals_keras_train_eval_grads_stats(name):
    check_against_keras(name)


def test_equals_keras_without_jit():
    check_against_keras("ghost_2d", jit=False)


def _params(c):
    return {"weight": jnp.linspace(0.5, 1.5, c), "bias": jnp.linspace(-1.0, 1.0, c)}


@pytest.mark.parametrize("shape", [(12, 3), (6, 2, 2, 3)])
def test_each_ghost_is_a_batch_of_its_own_and_stats_are_the_ghost_mean(shape):
    vbs = 3 if shape[0] == 12 else 2
    x = jax.random.normal(jax.random.key(0), shape) * 2 + jnp.arange(shape[0]).reshape(
        (-1,) + (1,) * (len(shape) - 1)
    )
    c = shape[-1]
    params, stats = _params(c), bnjax.init(c)[1]
    y, new = jax.jit(lambda x: bnjax.apply(params, stats, x, True, virtual_batch_size=vbs))(x)
    ghosts = [x[i : i + vbs] for i in range(0, shape[0], vbs)]
    expected = jnp.concatenate([bnjax.apply(params, stats, g, True)[0] for g in ghosts])
    chex.assert_trees_all_close(y, expected, **F32)
    # Running statistics: one update with the mean over ghosts of mean and unbiased var.
    x64 = np.asarray(x, np.float64)
    axes = tuple(range(len(shape) - 1))
    means = np.stack([g.mean(axis=axes) for g in np.split(x64, len(ghosts))])
    varis = np.stack([g.var(axis=axes, ddof=1) for g in np.split(x64, len(ghosts))])
    chex.assert_trees_all_close(new["running_mean"], 0.1 * means.mean(0), **F32)
    chex.assert_trees_all_close(new["running_var"], 0.9 + 0.1 * varis.mean(0), **F32)
    assert int(new["num_batches_tracked"]) == 1


def test_one_ghost_is_plain_batchnorm_and_none_is_the_default_path():
    x = jax.random.normal(jax.random.key(1), (8, 4)) * 3 + 1
    params, stats = _params(4), bnjax.init(4)[1]
    plain = bnjax.apply(params, stats, x, True)
    chex.assert_trees_all_close(bnjax.apply(params, stats, x, True, virtual_batch_size=8), plain)
    jax.tree.map(
        np.testing.assert_array_equal,
        bnjax.apply(params, stats, x, True, virtual_batch_size=None),
        plain,
    )


def test_under_vmap_mask_and_axis_name():
    x = jax.random.normal(jax.random.key(2), (2, 8, 3)) * 2 + 1  # 2 shards of 8
    params, stats = _params(3), bnjax.init(3)[1]
    # vmap without a name: each element of the mapped axis is its own call.
    f = jax.vmap(lambda x: bnjax.apply(params, stats, x, True, virtual_batch_size=4))
    y, new = jax.jit(f)(x)
    for i in range(2):
        y_i, new_i = bnjax.apply(params, stats, x[i], True, virtual_batch_size=4)
        chex.assert_trees_all_close(
            (y[i], jax.tree.map(lambda a, i=i: a[i], new)), (y_i, new_i), **F32
        )
    # axis_name: ghosts stay per shard; running statistics average every shard's ghosts,
    # i.e. one device holding both shards.
    g = jax.vmap(
        lambda x: bnjax.apply(params, stats, x, True, virtual_batch_size=4, axis_name="d"),
        axis_name="d",
        out_axes=(0, None),
    )
    y_s, new_s = jax.jit(g)(x)
    y_1, new_1 = bnjax.apply(params, stats, x.reshape(16, 3), True, virtual_batch_size=4)
    chex.assert_trees_all_close((y_s.reshape(16, 3), new_s), (y_1, new_1), **F32)
    # mask: each ghost is a masked batch of its own; padding (NaN) never leaks.
    mask = jnp.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    padded = x[0].at[3].set(jnp.nan)
    y_m, new_m = jax.jit(
        lambda x: bnjax.apply(params, stats, x, True, virtual_batch_size=4, mask=mask)
    )(padded)
    y_a, _ = bnjax.apply(params, stats, x[0, :3], True)
    y_b, _ = bnjax.apply(params, stats, x[0, 4:], True)
    chex.assert_trees_all_close(
        y_m[jnp.array([0, 1, 2, 4, 5, 6, 7])], jnp.concatenate([y_a, y_b]), **F32
    )
    # Running statistics: ghosts weighted by their counts (3 and 4), n = 7 // 2 = 3.
    x64 = np.asarray(x[0], np.float64)
    a, b = x64[:3], x64[4:]
    mean = (3 * a.mean(0) + 4 * b.mean(0)) / 7
    var = (3 * a.var(0) + 4 * b.var(0)) / 7 * 3 / 2
    chex.assert_trees_all_close(new_m["running_mean"], 0.1 * mean, **F32)
    chex.assert_trees_all_close(new_m["running_var"], 0.9 + 0.1 * var, **F32)


def test_gradients_match_per_ghost_batchnorm():
    x = jax.random.normal(jax.random.key(3), (8, 3)) * 2 + 1
    params, stats = _params(3), bnjax.init(3)[1]

    def loss_ghost(p, x):
        return jnp.sum(jnp.sin(bnjax.apply(p, stats, x, True, virtual_batch_size=4)[0]))

    def loss_split(p, x):
        ys = [bnjax.apply(p, stats, x[i : i + 4], True)[0] for i in (0, 4)]
        return jnp.sum(jnp.sin(jnp.concatenate(ys)))

    g1 = jax.jit(jax.grad(loss_ghost, argnums=(0, 1)))(params, x)
    g2 = jax.grad(loss_split, argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(g1, g2, **F32)


class _Net(nn.Module):
    """A small ResNet-shaped linen model: conv-BN-relu, a residual conv-BN, a head."""

    vbs: int | None

    @nn.compact
    def __call__(self, x, train):
        bn = lambda: bnjax.linen.BatchNorm(virtual_batch_size=self.vbs)  # noqa: E731
        x = nn.relu(bn()(nn.Conv(4, (3, 3))(x), train=train))
        h = bn()(nn.Conv(4, (3, 3))(x), train=train)
        x = nn.relu(x + h).mean(axis=(1, 2))
        return nn.Dense(3)(x)


@pytest.mark.slow  # over 20 s on 2 cores
def test_a_whole_linen_model_with_ghost_batches_is_the_model_on_each_sub_batch():
    x = jax.random.normal(jax.random.key(4), (6, 5, 5, 2)) + 0.5
    variables = _Net(None).init(jax.random.key(0), x, train=False)
    run = jax.jit(
        lambda m, x: m.apply(variables, x, train=True, mutable=["batch_stats"]),
        static_argnums=0,
    )
    y, upd = run(_Net(2), x)
    parts = [run(_Net(None), x[i : i + 2]) for i in (0, 2, 4)]
    chex.assert_trees_all_close(y, jnp.concatenate([p[0] for p in parts]), **F32)
    # The running statistics move by the mean of the three sub-batches' updates (linear).
    mean_update = jax.tree.map(lambda *s: sum(s) / 3, *[p[1] for p in parts])
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), upd),
        jax.tree.map(lambda a: a.astype(jnp.float32), mean_update),
        **F32,
    )


def test_nnx_module_with_ghost_batches():
    from flax import nnx

    import bnjax.nnx

    x = jax.random.normal(jax.random.key(5), (8, 3)) * 2 + 1
    bn = bnjax.nnx.BatchNorm(3, virtual_batch_size=4)
    y = nnx.jit(lambda bn, x: bn(x))(bn, x)
    expected, stats = bnjax.apply(*bnjax.init(3), x, True, virtual_batch_size=4)
    chex.assert_trees_all_close(y, expected, **F32)
    chex.assert_trees_all_close(bn.running_var[...], stats["running_var"], **F32)


@pytest.mark.parametrize(
    ("vbs", "shape", "axis", "match"),
    [
        (3, (8, 2), -1, r"batch 8\) is not divisible by virtual_batch_size=3"),
        (0, (8, 2), -1, "must be a positive int"),
        (True, (8, 2), -1, "must be a positive int"),
        (2, (8, 2), 0, "batch axis 0"),
    ],
)
def test_bad_virtual_batch_size_is_a_trace_time_error(vbs, shape, axis, match):
    c = shape[axis]
    params, stats = bnjax.init(c)
    before = jax.tree.map(np.array, stats)
    f = jax.jit(lambda s, x: bnjax.apply(params, s, x, True, axis=axis, virtual_batch_size=vbs))
    with pytest.raises(ValueError, match=match):
        f(stats, jnp.ones(shape))
    jax.tree.map(np.testing.assert_array_equal, before, stats)
    if not isinstance(vbs, bool) and vbs <= 0:
        with pytest.raises(ValueError, match=match):
            bnjax.batch_norm(virtual_batch_size=vbs)


def test_one_value_per_ghost_is_the_usual_error():
    params, stats = bnjax.init(2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnjax.apply(params, stats, jnp.ones((4, 2)), True, virtual_batch_size=1)
