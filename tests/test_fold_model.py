"""`bnjax.deploy.fold` on whole models: a ResNet as linen (plain and `nn.scan`), nnx, functional.

Expected numbers come from PyTorch (`tests/fixtures/resnet_deploy.npz`, written by
`scripts/export_resnet_deploy_fixture.py`): `fuse_conv_bn_eval` for every conv ->
BatchNorm pair, and the eval-mode output of the unfolded model. The fixture's
downsample BatchNorm has `eps=1e-3` and every conv is built without a bias, the two
cases that gave silently wrong folded models before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deploy_models import (
    PAIRS,
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

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax import deploy

ROOT = Path(__file__).resolve().parents[1]
EXPORTER = ROOT / "scripts" / "export_resnet_deploy_fixture.py"
TOL = dict(rtol=1e-5, atol=2e-6)
ARRAYS = fixture()


def _torch_fused(name):
    """torch's fused conv as (HWIO kernel, bias)."""
    w = ARRAYS[f"fused/{name}/weight"]
    return w.transpose(2, 3, 1, 0), ARRAYS[f"fused/{name}/bias"]


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@pytest.mark.parametrize(
    "scan, remat",
    [(False, False), (True, False), (False, True)],
    ids=["plain", "nn.scan", "nn.remat"],
)
def test_linen_resnet_folds_to_torch_fuse_conv_bn_eval(scan, remat):
    model = LinenResNet(scan=scan, remat=remat)
    variables = linen_variables(ARRAYS, scan=scan)
    before = jax.tree.map(np.array, variables)
    x = x_nhwc(ARRAYS)

    folded = deploy.fold(model, variables, x, train=False)

    # Every pair found by itself, each BatchNorm with its own eps.
    found = {(p.layer, p.bn): p.eps for p in folded.pairs}
    if scan:  # layer1's two blocks are one scanned module, folded slice by slice
        assert (("layer1", "block", "conv1"), ("layer1", "block", "bn1")) in found
    assert len(found) == (6 if scan else 8)
    assert found[(("layer2_0", "down_conv"), ("layer2_0", "down_bn"))] == 1e-3
    assert found[(("conv1",), ("bn1",))] == 1e-5
    # No BatchNorm is left, and convs built without bias now carry the folded one.
    assert jax.tree.leaves(folded.variables["batch_stats"]) == []
    params = scan_to_unrolled(folded.variables["params"]) if scan else folded.variables["params"]
    for name, (layer, bn) in PAIRS.items():
        kernel, bias = _torch_fused(name)
        np.testing.assert_allclose(_at(params, layer)["kernel"], kernel, **TOL)
        np.testing.assert_allclose(_at(params, layer)["bias"], bias, **TOL)
        assert bn[-1] not in _at(params, layer[:-1])
    # The folded model runs with the module's own apply, and gives torch's outputs.
    out = jax.jit(lambda v, x: folded.apply(v, x, train=False))(folded.variables, x)
    np.testing.assert_allclose(out, ARRAYS["eval_out"], **TOL)
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # caller's tree untouched


def test_linen_folded_variables_without_the_folded_apply_fail_loudly():
    """Run as the plain module, the folded tree is an error, never a model without its biases."""
    variables = linen_variables(ARRAYS, scan=False)
    x = x_nhwc(ARRAYS)
    folded = deploy.fold(LinenResNet(), variables, x, train=False)
    with pytest.raises(ValueError, match="bnjax.linen.BatchNorm at '/bn1'"):
        LinenResNet().apply(folded.variables, x, train=False)
    with pytest.raises(ValueError, match="is folded; a folded model runs in eval mode only"):
        folded.apply(folded.variables, x, train=True)


@pytest.mark.slow  # over 20 s on 2 cores
def test_nnx_resnet_folds_to_torch_fuse_conv_bn_eval():
    model = nnx_resnet(ARRAYS)
    before = jax.tree.map(np.array, nnx.state(model))
    x = x_nhwc(ARRAYS)

    folded = deploy.fold(model, x)

    assert not folded.bn1.__class__.__name__.endswith("BatchNorm")
    blocks = {
        "layer1_0": folded.layer1[0],
        "layer1_1": folded.layer1[1],
        "layer2_0": folded.layer2[0],
    }
    for name, (layer, _) in PAIRS.items():
        conv = blocks[layer[0]] if layer[0] in blocks else folded
        conv = getattr(conv, layer[-1])
        kernel, bias = _torch_fused(name)
        assert conv.use_bias  # given a bias, not dropped
        np.testing.assert_allclose(conv.kernel[...], kernel, **TOL)
        np.testing.assert_allclose(conv.bias[...], bias, **TOL)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(folded, x), ARRAYS["eval_out"], **TOL)
    # The model itself is unchanged and still in training mode.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    assert model.bn1.training and isinstance(model.layer2[0].down_bn, bnjax.nnx.BatchNorm)
    with pytest.raises(ValueError, match="folded; a folded model runs in eval mode only"):
        folded.bn1(x, train=True)


def test_functional_resnet_folds_with_each_batchnorms_eps():
    params, stats = torch_to_trees(ARRAYS)
    x = x_nhwc(ARRAYS)

    def apply_fn(params, batch_stats, x, bn):
        return functional_resnet(params, batch_stats, x, bn)

    folded = deploy.fold(apply_fn, params, stats, x, pairs=list(PAIRS.values()))
    eps = {p.bn: p.eps for p in folded.pairs}
    assert eps[("layer2_0", "down_bn")] == 1e-3 and eps[("bn1",)] == 1e-5  # read through `bn`
    for name, (layer, _) in PAIRS.items():
        kernel, bias = _torch_fused(name)
        np.testing.assert_allclose(_at(folded.params, layer)["kernel"], kernel, **TOL)
        np.testing.assert_allclose(_at(folded.params, layer)["bias"], bias, **TOL)
    logits, _ = jax.jit(folded.apply)(folded.params, folded.batch_stats, x)
    np.testing.assert_allclose(logits, ARRAYS["eval_out"], **TOL)
    with pytest.raises(ValueError, match="pairs=\\[\\(layer_path, bn_path\\)"):
        deploy.fold(apply_fn, params, stats, x)


def test_folded_kernel_matches_a_float64_reference_with_eps_1e_3():
    """The eps=1e-3 downsample pair, against NumPy in float64 (not only against torch)."""
    variables = linen_variables(ARRAYS, scan=False)
    folded = deploy.fold(LinenResNet(), variables, x_nhwc(ARRAYS), train=False)
    p = variables["params"]["layer2_0"]
    s = variables["batch_stats"]["layer2_0"]["down_bn"]
    f64 = {k: np.asarray(v, np.float64) for k, v in {**p["down_bn"], **s}.items()}
    scale = f64["weight"] / np.sqrt(f64["running_var"] + 1e-3)
    expected = np.asarray(p["down_conv"]["kernel"], np.float64) * scale
    got = folded.variables["params"]["layer2_0"]["down_conv"]
    np.testing.assert_allclose(got["kernel"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        got["bias"], f64["bias"] - f64["running_mean"] * scale, rtol=1e-6, atol=1e-7
    )
    # The old silent error: one default eps for every BatchNorm moved these by > 1e-4.
    wrong = f64["weight"] / np.sqrt(f64["running_var"] + 1e-5)
    assert np.abs(np.asarray(p["down_conv"]["kernel"]) * (wrong - scale)).max() > 1e-4


def test_fold_batchnorms_refuses_to_guess_eps():
    params, stats = torch_to_trees(ARRAYS)
    pair = PAIRS["layer2.0.downsample.0"]
    with pytest.raises(ValueError, match="no eps for BatchNorm layer2_0/down_bn.*deploy.fold"):
        deploy.fold_batchnorms(params, stats, [pair])
    # Per pair, the eps travels with the pair.
    fp, _ = deploy.fold_batchnorms(params, stats, [(*pair, 1e-3)])
    kernel, bias = _torch_fused("layer2.0.downsample.0")
    np.testing.assert_allclose(fp["layer2_0"]["down_conv"]["kernel"], kernel, **TOL)
    np.testing.assert_allclose(fp["layer2_0"]["down_conv"]["bias"], bias, **TOL)


# --- what cannot be folded is an error, never a different model.


class _Residual(nn.Module):
    """A conv whose output feeds its BatchNorm *and* a residual add."""

    @nn.compact
    def __call__(self, x, train):
        h = nn.Conv(3, (3, 3), use_bias=False)(x)
        return bnjax.linen.BatchNorm()(h, train=train) + h


def _trained(model, x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x + 1, train=True, mutable=["batch_stats"])
    return {**variables, **updates}


def test_fold_refuses_a_layer_whose_output_also_feeds_something_else():
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    variables = _trained(_Residual(), x)
    with pytest.raises(ValueError, match="folded model's output .* differs .* residual add"):
        deploy.fold(_Residual(), variables, x, train=False)


def test_fold_errors_name_the_pair_and_the_fix():
    variables = linen_variables(ARRAYS, scan=False)
    x = x_nhwc(ARRAYS)
    with pytest.raises(
        ValueError, match="layer2_0/down_bn is fed by layer2_0/down_conv, not by fc"
    ):
        deploy.fold(LinenResNet(), variables, x, train=False, pairs=[("fc", "layer2_0/down_bn")])
    with pytest.raises(ValueError, match="no bnjax BatchNorm at nope ran"):
        deploy.fold(LinenResNet(), variables, x, train=False, pairs=[("conv1", "nope")])
    with pytest.raises(ValueError, match="train=False"):  # folding is for eval mode
        deploy.fold(LinenResNet(), variables, x, train=True, pairs=[("conv1", "bn1")])
    # Explicit pairs fold only those.
    one = deploy.fold(LinenResNet(), variables, x, train=False, pairs=[("conv1", "bn1")])
    assert [p.bn for p in one.pairs] == [("bn1",)]
    assert "bn1" in one.variables["batch_stats"]["layer1_0"]


def test_fold_finds_nothing_to_fold_and_says_why():
    class BnFirst(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(3)(bnjax.linen.BatchNorm()(x, train=train))

    x = jnp.ones((4, 3))
    variables = BnFirst().init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="BatchNorm_0: its input is not exactly the output"):
        deploy.fold(BnFirst(), variables, x, train=False)


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.torch
def test_resnet_fixture_exporter_reproduces_the_fixture(tmp_path):
    torch = pytest.importorskip("torch", reason="re-running the fixture exporter needs torch")
    exported_with = json.loads(str(ARRAYS["__meta__"]))["torch_version"]
    if torch.__version__ != exported_with:
        pytest.skip(
            f"the fixture was exported with torch {exported_with}, this is {torch.__version__}"
        )
    out = tmp_path / "again.npz"
    subprocess.run([sys.executable, str(EXPORTER), "--out", str(out)], check=True, cwd=ROOT)
    with np.load(out) as new:
        assert sorted(new.files) == sorted(ARRAYS)
        for k in new.files:
            if k != "__meta__":
                np.testing.assert_array_equal(new[k], ARRAYS[k], err_msg=k)
        meta_new, meta_old = (json.loads(str(m)) for m in (new["__meta__"], ARRAYS["__meta__"]))
        for m in (meta_new, meta_old):  # the versions of numpy and Python may differ
            del m["numpy_version"], m["python_version"]
        assert meta_new == meta_old


# --- Dense -> BatchNorm, and misuse of the functional route.


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        h = nn.Dense(6, use_bias=False, precision=jax.lax.Precision.HIGHEST)(x)
        return bnjax.linen.BatchNorm(epsilon=0.5)(h, train=train)


class _NnxMlp(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.dense = nnx.Linear(
            4, 6, use_bias=False, precision=jax.lax.Precision.HIGHEST, rngs=rngs
        )
        self.bn = bnjax.nnx.BatchNorm(6, epsilon=0.5)

    def __call__(self, x):
        return self.bn(self.dense(x))


def _mlp_reference(kernel, bn_params, bn_stats, x):
    """Dense then eval BatchNorm with eps=0.5, in float64 NumPy."""
    z = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in {**bn_params, **bn_stats}.items()}
    return (z - p["running_mean"]) / np.sqrt(p["running_var"] + 0.5) * p["weight"] + p["bias"]


def test_dense_then_batchnorm_folds_in_linen_and_nnx():
    x = jax.random.normal(jax.random.key(2), (5, 4))
    variables = _trained(_Mlp(), x)
    folded = deploy.fold(_Mlp(), variables, x, train=False)
    assert [(p.layer, p.bn, p.eps) for p in folded.pairs] == [(("Dense_0",), ("BatchNorm_0",), 0.5)]
    p, s = variables["params"], variables["batch_stats"]
    expected = _mlp_reference(p["Dense_0"]["kernel"], p["BatchNorm_0"], s["BatchNorm_0"], x)
    np.testing.assert_allclose(folded.apply(folded.variables, x, train=False), expected, **TOL)

    model = _NnxMlp()
    model(x + 1.0)  # one training step moves the running statistics
    folded_nnx = deploy.fold(model, x)
    bn = model.bn
    bn_params = {"weight": bn.weight[...], "bias": bn.bias[...]}
    bn_stats = {"running_mean": bn.running_mean[...], "running_var": bn.running_var[...]}
    expected = _mlp_reference(model.dense.kernel[...], bn_params, bn_stats, x)
    np.testing.assert_allclose(folded_nnx(x), expected, **TOL)


def test_functional_fold_errors_name_the_fix():
    params, stats = torch_to_trees(ARRAYS)
    x = x_nhwc(ARRAYS)

    def training(params, batch_stats, x, bn):
        return functional_resnet(params, batch_stats, x, bn, train=True)

    with pytest.raises(ValueError, match="bn1 ran with train=True; fold runs the eval-mode"):
        deploy.fold(training, params, stats, x, pairs=[("conv1", "bn1")])

    def bypasses_bn(params, batch_stats, x, bn):
        del bn
        return functional_resnet(params, batch_stats, x)

    with pytest.raises(ValueError, match="no BatchNorm entry at bn1; call the `bn` it is given"):
        deploy.fold(bypasses_bn, params, stats, x, pairs=[("conv1", "bn1")])


def test_batchnorms_left_unfolded_are_named_in_a_warning():
    """A scanned model whose nn.scan drops the reports folds the rest, and says which not."""
    variables = linen_variables(ARRAYS, scan=True)
    x = x_nhwc(ARRAYS)
    model = LinenResNet(scan=True, reports_in_scan=False)
    with pytest.warns(UserWarning, match="layer1/block/bn1: it reported nothing.*REPORTS"):
        folded = deploy.fold(model, variables, x, train=False)
    assert len(folded.pairs) == 4  # stem and layer2_0; layer1's BatchNorms still run
    np.testing.assert_allclose(
        folded.apply(folded.variables, x, train=False), ARRAYS["eval_out"], **TOL
    )


def test_nnx_scan_over_stacked_layers_folds_slice_by_slice():
    model = NnxStack()
    x = jax.random.normal(jax.random.key(0), (8, 3))
    model(x + 1.0)  # a training step: running statistics that are not the defaults
    folded = deploy.fold(model, x)
    assert folded.layers.lin.kernel[...].shape == (2, 3, 3) and folded.layers.lin.use_bias
    lin, bn = model.layers.lin, model.layers.bn
    arr = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    h = np.asarray(x, np.float64)
    for i in range(2):  # the eval-mode forward in float64
        z = h @ arr(lin.kernel)[i] + arr(lin.bias)[i]
        z = (z - arr(bn.running_mean)[i]) / np.sqrt(arr(bn.running_var)[i] + 1e-5)
        h = np.maximum(z * arr(bn.weight)[i] + arr(bn.bias)[i], 0)
    np.testing.assert_allclose(folded(x), h, **TOL)


def test_a_functional_model_of_factory_layers_folds_with_its_layers_eps():
    bn = bnjax.batch_norm(eps=0.25)
    bn_params, bn_stats = bn.init(2)
    rng = np.random.default_rng(6)
    bn_stats = dict(
        bn_stats, running_mean=jnp.asarray([0.5, -1.0]), running_var=jnp.asarray([2.0, 0.3])
    )
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
        "bn": bn_params,
    }
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    def eval_fn(params, batch_stats, x, bn_fn):
        del bn_fn  # the layers report for themselves
        h = jnp.dot(x, params["dense"]["kernel"], precision=jax.lax.Precision.HIGHEST)
        h = h + params["dense"].get("bias", 0.0)
        if isinstance(batch_stats["bn"], deploy.FoldedBatchNorm):
            return h, batch_stats
        y, _ = bn.normalize(params["bn"], batch_stats["bn"], h, False)
        return y, {"bn": bn.report(None)}

    folded = deploy.fold(eval_fn, params, {"bn": bn_stats}, x, pairs=[("dense", "bn")])
    assert folded.pairs[0].eps == 0.25
    z = np.asarray(x, np.float64) @ np.asarray(params["dense"]["kernel"], np.float64)
    expected = (z - [0.5, -1.0]) / np.sqrt(np.asarray([2.0, 0.3]) + 0.25)
    np.testing.assert_allclose(
        folded.apply(folded.params, folded.batch_stats, x)[0], expected, **TOL
    )
