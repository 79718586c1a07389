"""`update_bn` and `precise_bn` on a whole ResNet: linen, linen under `nn.scan`, nnx, functional.

Expected numbers: `torch.optim.swa_utils.update_bn` on the same ResNet and batches
(`tests/fixtures/resnet_deploy.npz`, `scripts/export_resnet_deploy_fixture.py`), and
for the pooled variant a NumPy float64 reference of the stem BatchNorm's input (the
stem conv's output, which no BatchNorm precedes) pooled over all batches. No model
is rebuilt: the layers keep their `momentum=0.1`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deploy_models import (
    LinenResNet,
    NnxStack,
    fixture,
    functional_resnet,
    linen_variables,
    nnx_resnet,
    scan_to_unrolled,
    torch_to_trees,
    x_nhwc,
)
from flax import nnx

import bnjax.nnx
from bnjax import deploy

ARRAYS = fixture()
BATCHES = [x_nhwc(ARRAYS, f"batch_{i}") for i in range(3)]
TORCH_AFTER = torch_to_trees(ARRAYS, "after/")[1]
TOL = dict(rtol=2e-5, atol=2e-6)


def _stem_pooled_float64():
    """Mean and unbiased var of the stem conv's output over all batches, in float64."""
    k = ARRAYS["state/conv1.weight"].astype(np.float64).transpose(2, 3, 1, 0)  # HWIO
    outs = []
    for b in BATCHES:
        x = np.pad(np.asarray(b, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = b.shape[1:3]
        outs.append(sum(x[:, i : i + h, j : j + w] @ k[i, j] for i in range(3) for j in range(3)))
    z = np.concatenate(outs).reshape(-1, k.shape[-1])
    return z.mean(0), z.var(0, ddof=1)


def _run(kind, tool, **kw):
    """Runs `tool` on the ResNet of `kind`; returns the new statistics, unrolled names."""
    if kind.startswith("linen"):
        scan = kind == "linen-scan"
        variables = linen_variables(ARRAYS, scan=scan)
        before = jax.tree.map(np.array, variables)
        model = LinenResNet(scan=scan, remat=kind == "linen-remat")
        new = tool(model, variables, BATCHES, progress=False, **kw)
        jax.tree.map(np.testing.assert_array_equal, variables, before)  # not modified
        assert set(new) == {"params", "batch_stats"} and new["params"] is variables["params"]
        return scan_to_unrolled(new["batch_stats"]) if scan else new["batch_stats"]
    if kind == "nnx":
        model = nnx_resnet(ARRAYS)
        assert tool(model, BATCHES, progress=False, **kw) is model  # updated in place
        assert model.bn1.training  # its mode is its own
        blocks = {"layer1_0": model.layer1[0], "layer1_1": model.layer1[1]}
        blocks["layer2_0"] = model.layer2[0]
        stats = {}
        for name, module in (("bn1", model.bn1),) + tuple(
            (f"{b}/{n}", getattr(m, n))
            for b, m in blocks.items()
            for n in ("bn1", "bn2", "down_bn")
        ):
            if module is None:
                continue
            node = stats
            *path, leaf = name.split("/")
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = {k: getattr(module, k)[...] for k in TORCH_AFTER["bn1"]}
        return stats
    params, stats = torch_to_trees(ARRAYS)

    def apply_fn(params, batch_stats, x, bn):
        return functional_resnet(params, batch_stats, x, bn, train=True)

    if tool is deploy.update_bn:  # the functional update_bn is PyTorch's loop: momentum=None
        import functools

        import bnjax

        cumulative = functools.partial(bnjax.apply, momentum=None)
        return tool(
            lambda p, s, x: apply_fn(p, s, x, cumulative)[1], params, stats, BATCHES, progress=False
        )
    return tool(apply_fn, params, stats, BATCHES, progress=False, **kw)


KINDS = ["linen", "linen-scan", "nnx", "functional"]


@pytest.mark.parametrize("kind", [*KINDS, "linen-remat"])
def test_whole_model_matches_torch_update_bn(kind):
    """(For linen and nnx, update_bn is precise_bn(pooled=False) on the reports.)"""
    new = _run(kind, deploy.update_bn)
    leaves = jax.tree_util.tree_leaves_with_path(TORCH_AFTER)
    assert len(leaves) == 8 * 3
    for path, expected in leaves:
        got = new
        for k in path:
            got = got[k.key]
        if path[-1].key == "num_batches_tracked":
            assert int(got) == int(expected) == 3
        else:
            np.testing.assert_allclose(got, expected, **TOL, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_pooled_matches_float64(kind):
    new = _run(kind, deploy.precise_bn, pooled=True)
    mean, var = _stem_pooled_float64()
    np.testing.assert_allclose(new["bn1"]["running_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["bn1"]["running_var"], var, rtol=1e-5, atol=1e-6)
    # Pooled is not PyTorch's equal weight here (batch sizes 5, 5, 3, shifted means).
    assert not np.allclose(new["bn1"]["running_var"], TORCH_AFTER["bn1"]["running_var"], rtol=1e-3)


def test_scan_without_reports_in_variable_axes_is_an_error_not_a_skip():
    variables = linen_variables(ARRAYS, scan=True)
    model = LinenResNet(scan=True, reports_in_scan=False)
    with pytest.raises(ValueError, match="layer1/block/bn1.*bnjax.linen.REPORTS: 0"):
        deploy.precise_bn(model, variables, BATCHES, progress=False)


def test_eval_mode_forward_is_an_error():
    variables = linen_variables(ARRAYS, scan=False)
    with pytest.raises(ValueError, match="ran in eval mode.*pass train=True"):
        deploy.precise_bn(LinenResNet(), variables, BATCHES, train=False, progress=False)


def test_inputs_maps_a_batch_to_the_models_arguments():
    variables = linen_variables(ARRAYS, scan=False)
    labelled = [{"image": x, "label": jnp.zeros(len(x))} for x in BATCHES]
    new = deploy.precise_bn(
        LinenResNet(),
        variables,
        labelled,
        inputs=lambda b: (b["image"],),
        pooled=False,
        progress=False,
    )
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["running_var"], TORCH_AFTER["bn1"]["running_var"], **TOL
    )
    model = nnx_resnet(ARRAYS)
    deploy.precise_bn(model, labelled, inputs=lambda b: (b["image"],), pooled=False, progress=False)
    np.testing.assert_allclose(model.bn1.running_var[...], TORCH_AFTER["bn1"]["running_var"], **TOL)
    assert isinstance(model, nnx.Module)


# --- an nnx model whose layers are stacked (nnx.vmap) and run with nnx.scan.


def test_nnx_scan_over_stacked_layers_pools_each_layer():
    model = NnxStack()
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(n, 3)) + i, jnp.float32) for i, n in enumerate((6, 4))]
    w = np.asarray(model.layers.lin.kernel[...], np.float64)
    b = np.asarray(model.layers.lin.bias[...], np.float64)
    gamma = np.asarray(model.layers.bn.weight[...], np.float64)
    beta = np.asarray(model.layers.bn.bias[...], np.float64)
    inputs = [[], []]  # each layer's BatchNorm input, per batch, by a float64 forward
    for x in batches:
        h = np.asarray(x, np.float64)
        for i in range(2):
            z = h @ w[i] + b[i]
            inputs[i].append(z)
            h = np.maximum((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) * gamma[i] + beta[i], 0)

    deploy.precise_bn(model, batches, progress=False)

    for i in range(2):
        z = np.concatenate(inputs[i])
        np.testing.assert_allclose(
            model.layers.bn.running_mean[...][i], z.mean(0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            model.layers.bn.running_var[...][i], z.var(0, ddof=1), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(model.layers.bn.num_batches_tracked[...], [2, 2])


def test_a_layer_called_twice_per_forward_counts_each_call():
    """As PyTorch's cumulative average: each call of a shared BatchNorm is one batch."""
    import flax.linen as nn

    import bnjax.linen

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            bn = bnjax.linen.BatchNorm()
            return bn(x, train=train) + bn(2.0 * x + 1.0, train=train)

    rng = np.random.default_rng(3)
    batches = [jnp.asarray(rng.normal(size=(n, 2)), jnp.float32) for n in (5, 3)]
    variables = Shared().init(jax.random.key(0), batches[0], train=False)
    new = deploy.precise_bn(Shared(), variables, batches, progress=False)["batch_stats"]
    seen = np.concatenate([np.asarray(b, np.float64) for b in batches])
    seen = np.concatenate([seen, 2.0 * seen + 1.0])
    np.testing.assert_allclose(new["BatchNorm_0"]["running_mean"], seen.mean(0), **TOL)
    np.testing.assert_allclose(new["BatchNorm_0"]["running_var"], seen.var(0, ddof=1), **TOL)
    assert int(new["BatchNorm_0"]["num_batches_tracked"]) == 4


def test_a_functional_model_of_factory_layers_reports_through_its_layers():
    """`bnjax.batch_norm` layers return their own reports: no `bn` argument needed."""
    import bnjax

    bn = bnjax.batch_norm(eps=1e-3, momentum=0.3)
    bn_params, bn_stats = bn.init(2)
    rng = np.random.default_rng(4)
    kernel = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    batches = [jnp.asarray(rng.normal(size=(n, 3)) + i, jnp.float32) for i, n in enumerate((4, 6))]

    def apply_fn(params, batch_stats, x, unused_bn):
        h = jnp.dot(x, params["dense"], precision=jax.lax.Precision.HIGHEST)
        y, moments = bn.normalize(params["bn"], batch_stats["bn"], h, True)
        return y, {"bn": bn.report(moments)}

    params = {"dense": kernel, "bn": bn_params}
    new = deploy.precise_bn(apply_fn, params, {"bn": bn_stats}, batches, progress=False)
    z = np.concatenate(
        [np.asarray(b, np.float64) @ np.asarray(kernel, np.float64) for b in batches]
    )
    np.testing.assert_allclose(new["bn"]["running_mean"], z.mean(0), **TOL)
    np.testing.assert_allclose(new["bn"]["running_var"], z.var(0, ddof=1), **TOL)


def test_nnx_dropout_draws_fresh_masks_from_batch_to_batch():
    """The model copy's state (its RNG counters) goes on from batch to batch."""

    class Net(nnx.Module):
        def __init__(self):
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
            self.bn = bnjax.nnx.BatchNorm(3)

        def __call__(self, x):
            return self.bn(self.drop(x))

    x = jnp.ones((64, 3))
    once, twice = Net(), Net()
    deploy.precise_bn(once, [x], pooled=False, progress=False)
    deploy.precise_bn(twice, [x, x], pooled=False, progress=False)
    # The same mask twice would average to the one-batch mean exactly.
    assert not np.array_equal(once.bn.running_mean[...], twice.bn.running_mean[...])


def test_precise_bn_on_a_renorm_model_keeps_its_renorm_statistics():
    """A Batch Renormalization layer is a BatchNorm to precise BN: its running statistics
    are recomputed (float64 pooled reference) and `renorm_mean`/`renorm_std` kept."""
    import flax.linen as nn

    import bnjax.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return bnjax.linen.BatchNorm(renorm=bnjax.Renorm(rmax=2.0, dmax=1.0))(x, train=train)

    rng = np.random.default_rng(3)
    batches = [jnp.asarray(rng.normal(2.0, 3.0, (n, 4)).astype(np.float32)) for n in (5, 9)]
    model = Net()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    stats = dict(variables["batch_stats"]["BatchNorm_0"])
    stats["renorm_std"] = stats["renorm_std"] * 2.0  # not the init value: must survive as is
    variables = {**variables, "batch_stats": {"BatchNorm_0": stats}}
    new = deploy.precise_bn(model, variables, batches, progress=False)
    got = new["batch_stats"]["BatchNorm_0"]
    assert set(got) == set(stats)
    np.testing.assert_array_equal(got["renorm_std"], stats["renorm_std"])
    np.testing.assert_array_equal(got["renorm_mean"], stats["renorm_mean"])
    allx = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(got["running_mean"], allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["running_var"], allx.var(0, ddof=1), rtol=1e-5)
