"""The one model layer (`bnjax/_model`): statistics by path in any tree type, one run per kind.

And what it fixed: the `bn` a tool hands a functional model is built from the whole
`BatchNormConfig`, so `precise_bn` and `fold` work on layers with Batch
Renormalization and ghost batches (before, `bn` lacked `renorm` and
`virtual_batch_size`: TypeError).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import ref_moments

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax import deploy
from bnjax._model import tree
from bnjax._model.run import run

RENORM = bnjax.Renorm(rmax=2.0, dmax=1.0)


def conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def two_layer_forward(params, stats, x, bn, train=True):
    """A BatchNorm with renorm on the raw input, then conv -> BatchNorm with ghost batches."""
    h, s0 = bn(params["bn_in"], stats["bn_in"], x, train, renorm=RENORM, momentum=0.2)
    h = conv(h, params["conv"]["kernel"])
    if "bias" in params["conv"]:
        h = h + params["conv"]["bias"]
    h, s1 = bn(params["bn"], stats["bn"], h, train, virtual_batch_size=2, eps=1e-3)
    return h.mean(axis=(1, 2)), {"bn_in": s0, "bn": s1}


def two_layer_model(key):
    p_in, s_in = bnjax.init(3, renorm=True)
    p, s = bnjax.init(4)
    kernel = 0.3 * jax.random.normal(key, (3, 3, 3, 4))
    return {"bn_in": p_in, "conv": {"kernel": kernel}, "bn": p}, {"bn_in": s_in, "bn": s}


def test_precise_bn_on_a_functional_model_with_renorm_and_ghost_batches():
    params, stats = two_layer_model(jax.random.key(0))
    batches = [jax.random.normal(jax.random.key(i), (4, 5, 5, 3)) * (1 + i) + i for i in range(3)]
    new = deploy.precise_bn(two_layer_forward, params, stats, batches, progress=False)
    # The first BatchNorm reads the raw input: its pooled statistics are those of all
    # the values of all batches (NumPy float64, unbiased variance).
    mean, var, n = ref_moments(np.concatenate(batches), axes=(-1,))
    np.testing.assert_allclose(new["bn_in"]["running_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["bn_in"]["running_var"], var * n / (n - 1), rtol=1e-5)
    assert int(new["bn"]["num_batches_tracked"]) == 3
    # Renorm's own statistics are training-time only: kept as they were.
    np.testing.assert_array_equal(new["bn_in"]["renorm_std"], stats["bn_in"]["renorm_std"])


def test_fold_on_a_functional_model_with_renorm_and_ghost_batches():
    params, stats = two_layer_model(jax.random.key(1))
    stats["bn"] = dict(stats["bn"], running_mean=jnp.arange(4.0), running_var=jnp.arange(1.0, 5))
    x = jax.random.normal(jax.random.key(2), (4, 5, 5, 3))

    def forward(p, s, xb, bn):
        return two_layer_forward(p, s, xb, bn, train=False)

    folded = deploy.fold(forward, params, stats, x, pairs=[("conv", "bn")])
    assert folded.pairs[0].eps == 1e-3  # the layer's own eps, through its config
    out, _ = folded.apply(folded.params, folded.batch_stats, x)
    ref, _ = forward(params, stats, x, bnjax.apply)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_a_functional_model_that_returns_only_statistics_is_deprecated():
    p, s = bnjax.init(2)
    batches = [jnp.array([[0.0, 1.0], [2.0, 5.0]])]

    def old(params, stats, x, bn):  # the old precise_bn signature
        return {"bn": bn(params["bn"], stats["bn"], x, True)[1]}

    with pytest.warns(DeprecationWarning, match=r"return \(outputs, new_batch_stats\)"):
        new = deploy.precise_bn(old, {"bn": p}, {"bn": s}, batches, progress=False)
    np.testing.assert_allclose(new["bn"]["running_mean"], [1.0, 3.0])


# --- statistics by path, in every tree type.


def stats_tree():
    _, s = bnjax.init(2)
    return {"b": {"bn": s, "w": jnp.ones(3)}, "a": {"bn": s}, "head": {}}


def test_stats_at_lists_paths_in_tree_order_and_get_reads_them():
    t = stats_tree()
    frozen = flax.core.freeze(t)
    for tt in (t, frozen):
        assert list(tree.stats_at(tt)) == [("a", "bn"), ("b", "bn")]  # JAX's (sorted) order
        assert tree.get(tt, ("b", "bn")) is not None and tree.get(tt, ("b", "x")) is None


@pytest.mark.parametrize("freeze", [False, True])
def test_replace_keeps_the_tree_type_and_leaves_the_input_untouched(freeze):
    t = flax.core.freeze(stats_tree()) if freeze else stats_tree()
    bn = dict(tree.get(t, ("a", "bn")), running_mean=jnp.full(2, 7.0))
    out = tree.replace(t, {("a", "bn"): bn})
    assert type(out) is type(t)
    assert float(out["a"]["bn"]["running_mean"][0]) == 7.0
    assert float(t["a"]["bn"]["running_mean"][0]) == 0.0
    with pytest.raises(KeyError, match="no BatchNorm statistics at"):
        tree.replace(t, {("head",): bn})


def test_tree_view_round_trips_an_nnx_state():
    class Net(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([bnjax.nnx.BatchNorm(2), bnjax.nnx.BatchNorm(2)])

    state = nnx.state(Net(), nnx.BatchStat)
    view = tree.TreeView(state, "test")
    plain = view.plain(jax.tree.leaves(state))
    assert list(tree.stats_at(plain)) == [("blocks", 0), ("blocks", 1)]
    back = view.user(plain)
    assert jax.tree.structure(back) == jax.tree.structure(state)


def test_write_nnx_writes_by_path():
    class Net(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([bnjax.nnx.BatchNorm(2), bnjax.nnx.BatchNorm(2)])

    net = tree.write_nnx(Net(), {("blocks", 1): {"running_mean": jnp.full(2, 3.0)}})
    np.testing.assert_array_equal(net.blocks[1].running_mean[...], [3.0, 3.0])
    np.testing.assert_array_equal(net.blocks[0].running_mean[...], [0.0, 0.0])


# --- one run per kind: the same model three ways reports the same thing.


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return bnjax.linen.BatchNorm(epsilon=1e-3, name="bn")(x, train=train)


class NnxNet(nnx.Module):
    def __init__(self):
        self.bn = bnjax.nnx.BatchNorm(2, epsilon=1e-3)

    def __call__(self, x):
        return self.bn(x)


def test_run_reports_every_kind_alike():
    x = jnp.array([[0.0, 1.0], [2.0, 5.0], [4.0, 0.0]])
    mean, var, _ = ref_moments(np.asarray(x), axes=(-1,))
    variables = LinenNet().init(jax.random.key(0), x, train=False)
    net = NnxNet()
    net.train()
    p, s = bnjax.init(2)

    def functional(params, stats, xb, bn):
        y, new = bn(params["bn"], stats["bn"], xb, True, eps=1e-3)
        return y, {"bn": new}

    runs = {
        "linen": run(LinenNet(), variables, x, train=True, who="test"),
        "nnx": run(net, x, who="test"),
        "functional": run(functional, {"bn": p}, {"bn": s}, x, who="test"),
    }
    for kind, ran in runs.items():
        (path, report), *rest = tree.reports_at(ran.reports).items()
        assert not rest and path == ("bn",), kind
        assert report.config.eps == 1e-3 and int(report.count) == 3, kind
        np.testing.assert_allclose(report.mean, mean, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(report.var, var, rtol=1e-6, err_msg=kind)


# --- float64 end to end, in the functional core too.


@pytest.mark.parametrize(
    ("dtype", "stats"), [("float64", "float64"), ("float32", "float32"), ("bfloat16", "float32")]
)
def test_init_statistics_follow_a_wider_parameter_dtype(dtype, stats):
    with jax.enable_x64(True):
        params, batch_stats = bnjax.init(3, dtype=dtype, renorm=True)
        assert params["weight"].dtype == dtype
        for key in ("running_mean", "running_var", "renorm_mean", "renorm_std"):
            assert batch_stats[key].dtype == stats, key
        x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), dtype)
        _, new = bnjax.apply(params, batch_stats, x, True, renorm=bnjax.Renorm())
        assert new["running_var"].dtype == stats  # a step keeps them as they are
        if dtype == "float64":  # unbiased batch variance, PyTorch's update, in float64
            expected = 0.9 + 0.1 * np.var(np.asarray(x), 0, ddof=1)
            np.testing.assert_allclose(new["running_var"], expected, rtol=1e-13)


# --- the eval-trap check takes the one functional signature.


def test_check_batch_independence_takes_the_one_functional_signature():
    params, stats = two_layer_model(jax.random.key(3))
    stats["bn"] = dict(stats["bn"], running_mean=jnp.arange(4.0), running_var=jnp.arange(1.0, 5))
    x = jax.random.normal(jax.random.key(4), (4, 5, 5, 3))

    def forward(p, s, xb, bn):
        return two_layer_forward(p, s, xb, bn, train=False)

    assert deploy.check_batch_independence(forward, params, stats, x).ok
    with pytest.raises(deploy.EvalTrapError, match="depend on how examples are batched"):
        deploy.check_batch_independence(
            lambda p, s, xb, bn: two_layer_forward(p, s, xb, bn, train=True), params, stats, x
        )
    with pytest.warns(DeprecationWarning, match="apply_fn, params, batch_stats, batch"):
        old = deploy.check_batch_independence(
            lambda v, xb: forward(v[0], v[1], xb, bnjax.apply)[0], (params, stats), x
        )
    assert old.ok
