"""Folding eval-mode BatchNorm into the preceding Dense/Conv (bnjax.deploy)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import ref_batchnorm

import bnjax
from bnjax.deploy import bn_scale_shift, fold_batchnorms, fold_into_kernel

TOL = dict(rtol=1e-5, atol=1e-5)
# Exact float32 products: GPUs otherwise use TF32 passes for float32 convs and matmuls.
HI = jax.lax.Precision.HIGHEST


def _random_bn(rng, c, affine=True):
    params = {}
    if affine:
        params = {
            "weight": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
        }
    stats = {
        "running_mean": jnp.asarray(rng.normal(size=c), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.2, 3.0, c), jnp.float32),
        "num_batches_tracked": jnp.asarray(7, jnp.int32),
    }
    return params, stats


def _conv(x, kernel, bias, *, layout, groups):
    if layout == "HWIO":
        dn = ("NHWC", "HWIO", "NHWC")
    else:
        dn = ("NCHW", "OIHW", "NCHW")
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=groups, precision=HI
    )
    if bias is not None:
        y = y + (bias if layout == "HWIO" else bias[:, None, None])
    return y


@pytest.mark.parametrize("layout", ["HWIO", "OIHW"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("conv_kind", ["dense", "grouped", "depthwise"])
def test_fold_conv_matches_conv_then_bn(layout, with_bias, conv_kind):
    rng = np.random.default_rng(0)
    c_in, groups, c_out = {"dense": (4, 1, 6), "grouped": (4, 2, 6), "depthwise": (4, 4, 8)}[
        conv_kind
    ]
    hwio = rng.normal(size=(3, 3, c_in // groups, c_out)).astype(np.float32)
    kernel = jnp.asarray(hwio if layout == "HWIO" else hwio.transpose(3, 2, 0, 1))
    bias = jnp.asarray(rng.normal(size=c_out), jnp.float32) if with_bias else None
    x_nhwc = rng.normal(size=(2, 5, 5, c_in)).astype(np.float32)
    x = jnp.asarray(x_nhwc if layout == "HWIO" else x_nhwc.transpose(0, 3, 1, 2))
    bn_params, bn_stats = _random_bn(rng, c_out)
    feature_axis = -1 if layout == "HWIO" else 1

    z = _conv(x, kernel, bias, layout=layout, groups=groups)
    expected, _ = bnjax.apply(bn_params, bn_stats, z, train=False, axis=feature_axis)
    # Independent check of the unfolded stack against the NumPy float64 reference.
    ref, _ = ref_batchnorm(
        z, bn_params["weight"], bn_params["bias"], bn_stats, train=False, axes=(feature_axis,)
    )
    np.testing.assert_allclose(expected, ref, **TOL)

    scale, shift = bn_scale_shift(bn_params, bn_stats)
    k2, b2 = fold_into_kernel(
        kernel, bias, scale, shift, layout=None if layout == "HWIO" else "OIHW"
    )
    assert k2.shape == kernel.shape and k2.dtype == kernel.dtype and b2.shape == (c_out,)
    folded = _conv(x, k2, b2, layout=layout, groups=groups)
    np.testing.assert_allclose(folded, expected, **TOL)


@pytest.mark.parametrize("layout", [None, "OI"])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_dense_and_linear(layout, affine):
    rng = np.random.default_rng(1)
    w_io = rng.normal(size=(5, 3)).astype(np.float32)
    kernel = jnp.asarray(w_io if layout is None else w_io.T)  # Flax (in,out) / torch (out,in)
    bias = jnp.asarray(rng.normal(size=3), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    bn_params, bn_stats = _random_bn(rng, 3, affine=affine)
    expected, _ = bnjax.apply(
        bn_params, bn_stats, jnp.dot(x, w_io, precision=HI) + bias, train=False
    )
    k2, b2 = fold_into_kernel(kernel, bias, *bn_scale_shift(bn_params, bn_stats), layout=layout)
    folded = jnp.dot(x, k2 if layout is None else k2.T, precision=HI) + b2
    np.testing.assert_allclose(folded, expected, **TOL)


def test_fold_under_jit_equals_eager():
    rng = np.random.default_rng(2)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    bn_params, bn_stats = _random_bn(rng, 4)

    def fold(kernel, bn_params, bn_stats):
        return fold_into_kernel(kernel, None, *bn_scale_shift(bn_params, bn_stats))

    eager = fold(kernel, bn_params, bn_stats)
    jitted = jax.jit(fold)(kernel, bn_params, bn_stats)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --- a whole small CNN: conv1(1->4)-bn1-relu, conv2(4->8, grouped)-bn2-relu, mean, fc.


def _cnn_init(rng):
    p1, s1 = _random_bn(rng, 4)
    p2, s2 = _random_bn(rng, 8)
    params = {
        "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)) * 0.5, jnp.float32)},
        "bn1": p1,
        "block": {
            "conv2": {
                "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 8)) * 0.5, jnp.float32),
                "bias": jnp.asarray(rng.normal(size=8), jnp.float32),
            },
            "bn2": p2,
        },
        "fc": {
            "kernel": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
            "bias": jnp.zeros(10, jnp.float32),
        },
    }
    return params, {"bn1": s1, "block": {"bn2": s2}}


def _cnn_eval(params, stats, x):
    """Eval-mode forward; a BatchNorm missing from the trees (folded) is skipped."""

    def conv(p, h, groups):
        y = jax.lax.conv_general_dilated(
            h,
            p["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=HI,
            feature_group_count=groups,
        )
        return y + p["bias"] if "bias" in p else y

    def bn(p, s, h):
        return h if s is None else bnjax.apply(p, s, h, train=False)[0]

    h = jax.nn.relu(bn(params.get("bn1"), stats.get("bn1"), conv(params["conv1"], x, 1)))
    blk, sblk = params["block"], stats["block"]
    h = jax.nn.relu(bn(blk.get("bn2"), sblk.get("bn2"), conv(blk["conv2"], h, 2)))
    return jnp.dot(h.mean(axis=(1, 2)), params["fc"]["kernel"], precision=HI) + params["fc"]["bias"]


def test_fold_whole_cnn_end_to_end():
    rng = np.random.default_rng(3)
    params, stats = _cnn_init(rng)
    before = jax.tree.map(np.array, (params, stats))
    x = jnp.asarray(rng.normal(size=(3, 6, 6, 1)), jnp.float32)
    pairs = [("conv1", "bn1"), ("block/conv2", ("block", "bn2"))]
    fp, fs = fold_batchnorms(params, stats, pairs, eps=1e-5)

    assert set(fp) == {"conv1", "block", "fc"} and set(fp["block"]) == {"conv2"}
    assert fs == {"block": {}}  # running statistics of folded BatchNorms are gone
    assert set(fp["conv1"]) == {"kernel", "bias"}  # a bias was created
    expected = jax.jit(_cnn_eval)(params, stats, x)
    folded = jax.jit(_cnn_eval)(fp, fs, x)
    np.testing.assert_allclose(folded, expected, **TOL)
    # The caller's trees are untouched.
    jax.tree.map(np.testing.assert_array_equal, (params, stats), before)


def test_fold_errors_name_the_problem():
    rng = np.random.default_rng(4)
    params, stats = _cnn_init(rng)
    with pytest.raises(KeyError, match=r"'conv9'.*keys there: \['block', 'bn1', 'conv1', 'fc'\]"):
        fold_batchnorms(params, stats, [("conv9", "bn1")], eps=1e-5)
    with pytest.raises(KeyError, match="block/bn7"):
        fold_batchnorms(params, stats, [("block/conv2", "block/bn7")], eps=1e-5)
    # conv1 has 4 output channels, bn2 has 8.
    with pytest.raises(ValueError, match="4 output channels.*scale has shape \\(8,\\)"):
        fold_batchnorms(params, stats, [("conv1", "block/bn2")], eps=1e-5)
    with pytest.raises(ValueError, match="listed twice"):
        fold_batchnorms(params, stats, [("conv1", "bn1"), ("conv1", "bn1")], eps=1e-5)
    with pytest.raises(ValueError, match="track_running_stats"):
        bn_scale_shift({}, {})
    with pytest.raises(ValueError, match="layout 'OIHW'"):
        fold_into_kernel(jnp.ones((4, 5)), None, jnp.ones(5), jnp.ones(5), layout="OIHW")
    with pytest.raises(KeyError, match="pass kernel_key="):
        fold_batchnorms(params, stats, [("fc", "bn1")], eps=1e-5, kernel_key="weight")


def test_fold_pytorch_layout_tree_from_a_state_dict():
    """A torch state_dict kept in torch layouts (OIHW, (out, in)) folds with layout='OIHW'."""
    from bnjax import interop

    d = np.load(Path(__file__).parent / "fixtures" / "precise_bn_update_bn.npz")
    sd = {k[len("after/") :]: d[k] for k in d.files if k.startswith("after/")}
    params, stats = interop.from_torch_state_dict(sd, conv_layout="OIHW", linear_layout="out_in")
    params, stats = jax.tree.map(jnp.asarray, (params, stats))
    x = jnp.asarray(d["batch_0"])  # NCHW

    def forward(params, stats, x):
        h = x
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            h = jax.lax.conv_general_dilated(
                h, params[conv]["weight"], (1, 1), "SAME",
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
                precision=jax.lax.Precision.HIGHEST,
            ) + params[conv]["bias"][:, None, None]  # fmt: skip
            if bn in stats:
                h, _ = bnjax.apply(params[bn], stats[bn], h, train=False, axis=1)
            h = jax.nn.relu(h)
        return (
            jnp.dot(h.mean(axis=(2, 3)), params["fc"]["weight"].T, precision=HI)
            + params["fc"]["bias"]
        )

    fp, fs = fold_batchnorms(
        params,
        stats,
        [("conv1", "bn1"), ("conv2", "bn2")],
        eps=1e-5,
        layout="OIHW",
        kernel_key="weight",
    )
    assert fs == {} and set(fp) == {"conv1", "conv2", "fc"}
    np.testing.assert_allclose(forward(fp, fs, x), forward(params, stats, x), **TOL)
