"""Whole-model porting: `bnjax.interop.from_torch` / `to_torch` / `match_layers`.

Layouts are checked against torch's definitions written independently of the
converter (a Linear is `x @ W.T + b`, a Conv is `lax.conv_general_dilated` in NCHW/OIHW,
a ConvTranspose is the scatter-add below), so these tests need no torch. Live-torch
checks (`load_state_dict(strict=True)`, every layer kind against torch's modules) are
marked `torch` and skip without it. Whole models against PyTorch fixtures are in
`test_port_models.py`.
"""

from __future__ import annotations

import copy
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import bnjax.linen
import bnjax.nnx
from bnjax import interop

RNG = np.random.default_rng(0)


def _r(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _torch_conv_transpose(x, w, stride, padding):
    """torch's ConvTranspose (groups=1, NC...): out[o, i*s + k] += x[c, i] * w[c, o, k]."""
    n, _, *size = x.shape
    k = w.shape[2:]
    full = [(s - 1) * st + kk for s, st, kk in zip(size, stride, k, strict=True)]
    out = np.zeros((n, w.shape[1], *full), np.float64)
    for kk in itertools.product(*(range(d) for d in k)):
        idx = tuple(
            slice(o, o + (s - 1) * st + 1, st) for o, s, st in zip(kk, size, stride, strict=True)
        )
        out[(slice(None), slice(None), *idx)] += np.einsum(
            "nc...,co->no...", x, w[(slice(None), slice(None), *kk)]
        )
    crop = tuple(slice(p, d - p) for p, d in zip(padding, full, strict=True))
    return out[(slice(None), slice(None), *crop)]


def _nc_to_nlc(x):
    return np.moveaxis(x, 1, -1)


class One(nn.Module):
    """A single Flax layer named like torch's module `m`."""

    make: object

    @nn.compact
    def __call__(self, x):
        return self.make()(x)


# --------------------------------------------------------------------------- layer kinds


@pytest.mark.parametrize("nd,groups,bias", [(1, 2, False), (2, 1, True), (3, 4, True)])
def test_conv_matches_torch_definition(nd, groups, bias):
    cin, cout, k = 4, 8, (3, 2, 2)[:nd]
    sd = {"m.weight": _r(cout, cin // groups, *k)}
    if bias:
        sd["m.bias"] = _r(cout)
    x = _r(2, cin, *(5, 4, 3)[:nd])
    dims = ("NC" + "XYZ"[:nd], "OI" + "XYZ"[:nd], "NC" + "XYZ"[:nd])
    expected = jax.lax.conv_general_dilated(
        x,
        sd["m.weight"],
        (1,) * nd,
        "VALID",
        dimension_numbers=dims,
        feature_group_count=groups,
        precision="highest",
    )
    if bias:
        expected = expected + sd["m.bias"].reshape(1, -1, *(1,) * nd)

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(
                cout,
                k,
                padding="VALID",
                feature_group_count=groups,
                use_bias=bias,
                name="m",
                precision="highest",
            )(x)

    xl = _nc_to_nlc(x)
    variables = interop.from_torch(sd, M().init(jax.random.key(0), xl))
    y = M().apply(variables, xl)
    np.testing.assert_allclose(_nc_to_nlc(np.asarray(expected)), y, rtol=1e-5, atol=1e-5)
    back = interop.to_torch(variables, sd)
    assert list(back) == list(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


@pytest.mark.parametrize("nd,stride,padding", [(1, 2, 0), (2, 2, 1), (3, 1, 0)])
def test_conv_transpose_matches_torch_definition(nd, stride, padding):
    cin, cout, k = 3, 5, (3, 3, 2)[:nd]
    sd = {"up.weight": _r(cin, cout, *k), "up.bias": _r(cout)}
    x = _r(2, cin, *(4, 3, 3)[:nd])
    expected = _torch_conv_transpose(
        x.astype(np.float64), sd["up.weight"].astype(np.float64), (stride,) * nd, (padding,) * nd
    )
    expected += sd["up.bias"].reshape(1, -1, *(1,) * nd)

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.ConvTranspose(
                cout, k, strides=(stride,) * nd, padding="VALID", precision="highest"
            )(x)

    xl = _nc_to_nlc(x)
    template = M().init(jax.random.key(0), xl)
    # Flax's automatic name `ConvTranspose_0` marks the kind; the torch path differs.
    variables = interop.from_torch(sd, template)
    y = np.asarray(M().apply(variables, xl))
    if padding:  # torch's padding crops the VALID output on both sides
        y = y[(slice(None), *(slice(padding, -padding),) * nd)]
    np.testing.assert_allclose(_nc_to_nlc(expected), y, rtol=1e-5, atol=1e-5)
    back = interop.to_torch(variables, sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


def test_conv_transpose_by_explicit_name_needs_the_hint():
    sd = {"up.weight": _r(3, 3, 2, 2)}  # square: a Conv's shape fits too

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.ConvTranspose(3, (2, 2), use_bias=False, name="up")(x)

    template = M().init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    as_conv = interop.from_torch(sd, template)["params"]["up"]["kernel"]
    as_transpose = interop.from_torch(sd, template, conv_transpose=["up"])["params"]["up"]["kernel"]
    np.testing.assert_array_equal(
        as_transpose, np.flip(sd["up.weight"], (2, 3)).transpose(2, 3, 0, 1)
    )
    assert not np.array_equal(as_conv, as_transpose)
    assert (
        interop.match_layers(sd, template, conv_transpose=["up"]).pairs[0].kind == "conv_transpose"
    )


def test_linear_embedding_norms_and_batchnorms():
    sd = {
        "emb.weight": _r(7, 4),
        "fc.weight": _r(3, 4),
        "fc.bias": _r(3),
        "head.weight": _r(2, 3),  # Linear(bias=False): the same signature as an Embedding
        "ln.weight": _r(3),
        "ln.bias": _r(3),
        "gn.weight": _r(3),
        "gn.bias": _r(3),
        "bn.weight": _r(2),
        "bn.bias": _r(2),
        "bn.running_mean": _r(2),
        "bn.running_var": RNG.uniform(0.5, 2, 2).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "bn_nb.weight": _r(2),  # BatchNorm1d(2, bias=False)
        "bn_nb.running_mean": _r(2),
        "bn_nb.running_var": RNG.uniform(0.5, 2, 2).astype(np.float32),
        "bn_nb.num_batches_tracked": np.array(3, np.int64),
        "bn_na.running_mean": _r(2),  # affine=False
        "bn_na.running_var": RNG.uniform(0.5, 2, 2).astype(np.float32),
        "bn_na.num_batches_tracked": np.array(3, np.int64),
        "bn_nt.weight": _r(2),  # track_running_stats=False
        "bn_nt.bias": _r(2),
    }

    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(7, 4, name="emb")(ids)
            x = nn.Dense(3, name="fc")(x)
            x = nn.LayerNorm(epsilon=1e-5, name="ln")(x)
            x = nn.GroupNorm(num_groups=1, epsilon=1e-5, name="gn")(x)
            x = nn.Dense(2, use_bias=False, name="head")(x)
            x = bnjax.linen.BatchNorm(name="bn")(x, train=False)
            x = bnjax.linen.BatchNorm(use_bias=False, name="bn_nb")(x, train=False)
            x = bnjax.linen.BatchNorm(affine=False, name="bn_na")(x, train=False)
            return bnjax.linen.BatchNorm(track_running_stats=False, name="bn_nt")(x, train=False)

    ids = np.array([1, 5, 6, 0])
    template = M().init(jax.random.key(0), ids)
    variables = interop.from_torch(sd, template)
    assert variables["batch_stats"]["bn"]["num_batches_tracked"].dtype == jnp.int32
    y = np.asarray(M().apply(variables, ids), np.float64)

    # torch's definitions, in float64
    s = {k: v.astype(np.float64) for k, v in sd.items()}
    x = s["emb.weight"][ids] @ s["fc.weight"].T + s["fc.bias"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * s["ln.weight"] + s["ln.bias"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)  # 1 group
    x = x * s["gn.weight"] + s["gn.bias"]
    x = x @ s["head.weight"].T
    for bn in ("bn", "bn_nb", "bn_na"):
        x = (x - s[f"{bn}.running_mean"]) / np.sqrt(s[f"{bn}.running_var"] + 1e-5)
        x = x * s.get(f"{bn}.weight", 1.0) + s.get(f"{bn}.bias", 0.0)
    x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * s["bn_nt.weight"] + s["bn_nt.bias"]
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)

    back = interop.to_torch(variables, sd)
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value)
    # Without a reference: the names come from the Flax paths, torch's order per layer.
    no_ref = interop.to_torch(variables)
    assert sorted(no_ref) == sorted(sd)
    assert list(no_ref)[:3] == ["emb.weight", "fc.weight", "fc.bias"]
    assert no_ref["bn.num_batches_tracked"].dtype == np.int64


def test_template_dtypes_are_kept_only_when_asked_and_reference_dtypes_restored():
    sd = {"fc.weight": _r(3, 4), "fc.bias": _r(3)}

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, param_dtype=jnp.bfloat16, name="fc")(x)

    template = M().init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"(?s)^[^\n]*dtype.*\nFix:.*dtype='template'"):
        interop.from_torch(sd, template)  # float32 -> bfloat16 would round: not silently
    variables = interop.from_torch(sd, template, dtype="template")
    assert variables["params"]["fc"]["kernel"].dtype == jnp.bfloat16
    kept = interop.from_torch(sd, template, dtype="source")
    assert kept["params"]["fc"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(
        variables["params"]["fc"]["kernel"], sd["fc.weight"].T.astype(ml_dtypes.bfloat16)
    )
    with pytest.raises(ValueError, match=r"(?s)^[^\n]*dtype.*\nFix:.*dtype='reference'"):
        interop.to_torch(variables, sd, dtype=None)
    back = interop.to_torch(variables, sd)  # the reference's dtypes, as load_state_dict
    assert back["fc.weight"].dtype == np.float32
    assert interop.to_torch(variables, sd, dtype="source")["fc.weight"].dtype == ml_dtypes.bfloat16
    assert interop.to_torch(variables)["fc.weight"].dtype == ml_dtypes.bfloat16


# --------------------------------------------------------------------------- paths


class _Auto(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = bnjax.linen.BatchNorm()(x, train=False)
        x = nn.Sequential([nn.Dense(5), nn.Dense(2)])(x)  # inline: Dense_0, Dense_1
        return x


class _Seq(nn.Module):
    def setup(self):
        self.block = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])  # layers_0, layers_2

    def __call__(self, x):
        return self.block(x)


def _auto_sd():
    return {
        "features.0.weight": _r(4, 3, 3, 3),
        "features.0.bias": _r(4),
        "features.1.weight": _r(4),
        "features.1.bias": _r(4),
        "features.1.running_mean": _r(4),
        "features.1.running_var": np.ones(4, np.float32),
        "features.1.num_batches_tracked": np.array(1, np.int64),
        "classifier.0.weight": _r(5, 4),
        "classifier.0.bias": _r(5),
        "classifier.1.weight": _r(2, 5),
        "classifier.1.bias": _r(2),
    }


def test_automatic_names_match_by_order_with_a_report():
    sd = _auto_sd()
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    matching = interop.match_layers(sd, template)
    assert [(p.torch, p.flax, p.by) for p in matching.pairs] == [
        ("features.0", "Conv_0", "order"),
        ("features.1", "BatchNorm_0", "order"),
        ("classifier.0", "Dense_0", "order"),
        ("classifier.1", "Dense_1", "order"),
    ]
    assert "features.1    ->  BatchNorm_0  [batchnorm, order]" in str(matching)
    variables = interop.from_torch(sd, template)
    np.testing.assert_array_equal(
        variables["params"]["Dense_1"]["kernel"], sd["classifier.1.weight"].T
    )
    with pytest.raises(ValueError, match="classifier.0"):
        interop.from_torch(sd, template, match="path")
    back = interop.to_torch(variables, sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


def test_sequential_names_and_renames():
    sd = {
        "block.0.weight": _r(3, 4),
        "block.0.bias": _r(3),
        "block.2.weight": _r(2, 3),
        "block.2.bias": _r(2),
    }
    template = _Seq().init(jax.random.key(0), jnp.ones((1, 4)))
    assert list(template["params"]["block"]) == ["layers_0", "layers_2"]
    variables = interop.from_torch(sd, template, match="path")
    np.testing.assert_array_equal(
        variables["params"]["block"]["layers_2"]["kernel"], sd["block.2.weight"].T
    )
    renamed = {k.replace("block.", "body."): v for k, v in sd.items()}
    for rename in ({"body": "block"}, lambda p: p.replace("body", "block")):
        v = interop.from_torch(renamed, template, rename=rename, match="path")
        np.testing.assert_array_equal(v["params"]["block"]["layers_0"]["bias"], sd["block.0.bias"])
    back = interop.to_torch(variables, rename={"body": "block"})
    assert list(back) == list(renamed)


def test_nnx_state_and_split_templates():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = bnjax.nnx.BatchNorm(4)
            self.head = nnx.Sequential(nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs))

        def __call__(self, x):
            return self.head(self.bn(self.conv(x)).mean((1, 2)))

    sd = {
        "conv.weight": _r(4, 3, 3, 3),
        "conv.bias": _r(4),
        "bn.weight": _r(4),
        "bn.bias": _r(4),
        "bn.running_mean": _r(4),
        "bn.running_var": np.ones(4, np.float32),
        "bn.num_batches_tracked": np.array(2, np.int64),
        "head.0.weight": _r(5, 4),
        "head.0.bias": _r(5),
        "head.1.weight": _r(2, 5),
        "head.1.bias": _r(2),
    }
    model = Net(nnx.Rngs(0))
    state = nnx.state(model)
    before = jax.tree.map(np.array, state)
    new_state = interop.from_torch(sd, state)
    assert type(new_state) is type(state)
    chex_equal = jax.tree.map(np.array_equal, before, jax.tree.map(np.array, state))
    assert all(jax.tree.leaves(chex_equal))  # the template is untouched
    nnx.update(model, new_state)
    np.testing.assert_array_equal(model.head.layers[1].kernel.get_value(), sd["head.1.weight"].T)
    assert model.bn.num_batches_tracked.get_value().dtype == jnp.int32
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    new_params, new_stats = interop.from_torch(sd, (params, stats))
    np.testing.assert_array_equal(
        new_stats["bn"]["running_mean"].get_value(), sd["bn.running_mean"]
    )
    back = interop.to_torch(nnx.state(model), sd)
    assert list(back) == list(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


# --------------------------------------------------------------------------- bad input


def test_strict_error_lists_every_problem_and_changes_nothing():
    sd = _auto_sd()
    sd["features.0.weight"] = _r(4, 3, 5, 5)  # mis-shaped
    del sd["classifier.1.bias"]  # missing
    sd["extra.weight"] = _r(6)  # unexpected
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    sd_copy, template_copy = copy.deepcopy(sd), jax.tree.map(np.array, template)
    with pytest.raises(ValueError) as e:
        interop.from_torch(sd, template)
    msg = str(e.value)
    assert (
        "'features.0.weight' (4, 3, 5, 5) -> params/Conv_0/kernel: "
        "converted (5, 5, 3, 4) vs template (3, 3, 3, 4)" in msg
    )
    assert "params/Dense_1/bias (2,)" in msg
    assert "'extra.weight' (6,)" in msg
    assert "missing" in msg and "unexpected" in msg and "shape mismatches" in msg
    for k in sd_copy:
        np.testing.assert_array_equal(sd[k], sd_copy[k])
    assert list(sd) == list(sd_copy)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, template), template_copy)


def test_non_strict_skips_unpaired_but_not_shapes():
    sd = _auto_sd()
    del sd["classifier.1.bias"]
    sd["extra.weight"] = _r(6)
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    variables = interop.from_torch(sd, template, strict=False)
    np.testing.assert_array_equal(
        variables["params"]["Dense_1"]["bias"], template["params"]["Dense_1"]["bias"]
    )
    sd["features.0.bias"] = _r(5)
    with pytest.raises(ValueError, match=r"'features.0.bias' \(5,\)"):
        interop.from_torch(sd, template, strict=False)


def test_to_torch_errors():
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(
        ValueError,
        match=r"automatic names \['BatchNorm_0', 'Conv_0', 'Dense_0', 'Dense_1'\].*reference=",
    ):
        interop.to_torch(template)
    ref = _auto_sd()
    ref["features.2.weight"] = _r(3)
    ref["classifier.1.weight"] = _r(3, 5)
    with pytest.raises(ValueError) as e:
        interop.to_torch(template, ref)
    msg = str(e.value)
    assert "'features.2.weight' (3,)" in msg
    assert (
        "params/Dense_1/kernel (5, 2) -> 'classifier.1.weight': converted (2, 5) vs torch (3, 5)"
        in msg
    )


def test_flax_named_tree_into_to_torch_state_dict_is_an_error():
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"Flax's names.*Conv_0.kernel.*interop.to_torch"):
        interop.to_torch_state_dict(template["params"], template["batch_stats"])


def test_unknown_layer_kinds():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("alpha", nn.initializers.ones, (3,))

    template = Odd().init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"unknown kind.*<root>: \['alpha'\]"):
        interop.from_torch({"alpha": _r(3)}, template)

    flax_bn = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"flax BatchNorm.*bnjax.linen.BatchNorm"):
        interop.from_torch({}, flax_bn)

    sd = {"attn.in_proj_weight": _r(9, 3), **_auto_sd()}
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(
        ValueError, match=r"(?s)unexpected.*'attn.in_proj_weight' \(9, 3\) \(an unknown layer kind"
    ):
        interop.from_torch(sd, template)
    with pytest.raises(TypeError, match="state_dict"):
        interop.from_torch([1, 2], template)
    with pytest.raises(ValueError, match="match must be"):
        interop.from_torch(_auto_sd(), template, match="name")


def test_count_overflow_is_an_error():
    sd = _auto_sd()
    sd["features.1.num_batches_tracked"] = np.array(2**31, np.int64)
    template = _Auto().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="does not fit int32"):
        interop.from_torch(sd, template)


# --------------------------------------------------------------------------- live torch


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.torch
def test_every_layer_kind_against_torch_modules():
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    torch.manual_seed(0)

    class T(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv = tnn.Conv2d(3, 6, 3, padding=1, groups=3)
            self.bn = tnn.BatchNorm2d(6)
            self.up = tnn.ConvTranspose2d(6, 4, 3, stride=2)
            self.gn = tnn.GroupNorm(2, 4)
            self.c1 = tnn.Conv1d(4, 5, 2, bias=False)
            self.ln = tnn.LayerNorm(5)
            self.emb = tnn.Embedding(7, 5)
            self.fc = tnn.Linear(5, 3)

        def forward(self, x, ids):
            x = self.gn(self.up(self.bn(self.conv(x)))).mean(2)
            x = self.ln(self.c1(x).transpose(1, 2)).mean(1) + self.emb(ids)
            return self.fc(x)

    class F(nn.Module):
        @nn.compact
        def __call__(self, x, ids):
            x = nn.Conv(6, (3, 3), padding=1, feature_group_count=3)(x)
            x = bnjax.linen.BatchNorm()(x, train=False)
            x = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="VALID")(x)
            x = nn.GroupNorm(num_groups=2, epsilon=1e-5)(x).mean(1)
            x = nn.Conv(5, (2,), padding="VALID", use_bias=False)(x)
            x = nn.LayerNorm(epsilon=1e-5)(x).mean(1) + nn.Embed(7, 5)(ids)
            return nn.Dense(3)(x)

    t = T()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
        t.bn.running_mean.normal_()
        t.bn.running_var.uniform_(0.5, 2)
    t.eval()
    x, ids = torch.randn(2, 3, 5, 5), torch.tensor([1, 4])
    expected = t(x, ids).detach().numpy()
    xj, idj = x.numpy().transpose(0, 2, 3, 1), ids.numpy()
    variables = interop.from_torch(t, F().init(jax.random.key(0), xj, idj))  # the module itself
    np.testing.assert_allclose(F().apply(variables, xj, idj), expected, rtol=1e-5, atol=1e-5)
    sd = interop.to_torch(variables, t, return_tensors=True)
    t.load_state_dict(sd, strict=True)
    for key, value in t.state_dict().items():
        assert torch.equal(sd[key], value), key
    assert list(sd) == list(t.state_dict())


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), padding=1)(x)


class _Stem(nn.Module):
    """Conv_0 is called before Block_0, but sorts after it."""

    @nn.compact
    def __call__(self, x):
        return Block()(nn.Conv(4, (3, 3), padding=1)(x))


def test_sorted_keys_pair_what_the_shapes_tell_apart():
    """Conv_0 and Block_0/Conv_0 differ in shape: sorted keys cannot confuse them."""
    sd = {"conv1.weight": _r(4, 3, 3, 3), "conv1.bias": _r(4),
          "block.conv.weight": _r(4, 4, 3, 3), "block.conv.bias": _r(4)}  # fmt: skip
    x = jnp.ones((1, 5, 5, 3))
    init = jax.jit(_Stem().init)  # jit (like eval_shape and tree maps) sorts dict keys
    assert list(init(jax.random.key(0), x)["params"]) == ["Block_0", "Conv_0"]
    variables = interop.from_torch(sd, init(jax.random.key(0), x))
    np.testing.assert_array_equal(variables["params"]["Conv_0"]["bias"], sd["conv1.bias"])
    template = interop.flax_template(_Stem(), x)
    assert list(template["params"]) == ["Conv_0", "Block_0"]
    assert isinstance(template["params"]["Conv_0"]["kernel"], jax.ShapeDtypeStruct)
    trained = jax.jit(lambda v: v)(interop.from_torch(sd, template))
    back = interop.to_torch(trained, sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


class _SameStem(nn.Module):
    """Conv_0 (4 -> 4) is called before Block_0, whose conv has the same shape."""

    @nn.compact
    def __call__(self, x):
        return Block()(nn.Conv(4, (3, 3), padding=1)(x))


def test_sorted_keys_of_same_shaped_layers_are_an_error_that_says_so():
    sd = {"conv1.weight": _r(4, 4, 3, 3), "conv1.bias": _r(4),
          "block.conv.weight": _r(4, 4, 3, 3), "block.conv.bias": _r(4)}  # fmt: skip
    x = jnp.ones((1, 5, 5, 4))
    sorted_template = jax.jit(_SameStem().init)(jax.random.key(0), x)
    with pytest.raises(ValueError) as info:
        interop.from_torch(sd, sorted_template)
    lead = "\n".join(str(info.value).splitlines()[:3])
    assert "sorted" in lead and "flax_template" in lead and "definition_order" in lead, lead
    template = interop.flax_template(_SameStem(), x)
    variables = interop.from_torch(sd, sorted_template, definition_order=template)
    np.testing.assert_array_equal(variables["params"]["Conv_0"]["bias"], sd["conv1.bias"])
    trained = jax.jit(lambda v: v)(variables)  # e.g. after a jitted train step
    with pytest.raises(ValueError, match="definition_order=template"):
        interop.to_torch(trained, sd)
    back = interop.to_torch(trained, sd, definition_order=template)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


def test_to_torch_leaves_its_inputs_untouched():
    sd = _auto_sd()
    template = interop.flax_template(_Auto(), jnp.ones((1, 5, 5, 3)))
    variables = interop.from_torch(sd, template)
    before = jax.tree.map(np.array, variables)
    sd_before = copy.deepcopy(sd)
    out = interop.to_torch(variables, sd)
    out["features.0.weight"][...] = 0  # the result is a fresh copy
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, variables), before)
    for k, v in sd_before.items():
        np.testing.assert_array_equal(sd[k], v)


def test_flax_batchnorm_without_bias_is_a_weight_only_bnjax_batchnorm():
    """flax_interop: Flax's `use_bias=False` <-> bnjax's (and torch's) weight alone."""
    from bnjax import flax_interop

    x = _r(6, 3) * 2 + 1
    flax_bn = nn.BatchNorm(use_running_average=True, use_bias=False)
    flax_vars = {
        "params": {"scale": jnp.asarray(_r(3))},
        "batch_stats": {"mean": jnp.asarray(_r(3)), "var": jnp.asarray(RNG.uniform(0.5, 2, 3))},
    }
    ours = flax_interop.variables_from_flax(flax_vars)
    assert sorted(ours["params"]) == ["weight"]
    y = bnjax.linen.BatchNorm(use_bias=False).apply(ours, x, train=False)
    np.testing.assert_allclose(y, flax_bn.apply(flax_vars, x), rtol=1e-6, atol=1e-6)
    back = flax_interop.variables_to_flax(ours)
    assert sorted(back["params"]) == ["scale"]
    np.testing.assert_array_equal(back["params"]["scale"], flax_vars["params"]["scale"])


def test_per_batchnorm_trees_of_a_bias_free_state_dict():
    """from_torch_state_dict: torch's BatchNorm2d(bias=False) gives params {"weight"}."""
    sd = {
        "bn.weight": _r(3),
        "bn.running_mean": _r(3),
        "bn.running_var": RNG.uniform(0.5, 2, 3).astype(np.float32),
        "bn.num_batches_tracked": np.array(4, np.int64),
    }
    params, stats = interop.from_torch_state_dict(sd)
    assert sorted(params["bn"]) == ["weight"]
    x = _r(4, 5, 5, 3)
    y, _ = bnjax.apply(params["bn"], stats["bn"], x, train=False)
    expected = (x - sd["bn.running_mean"]) / np.sqrt(sd["bn.running_var"] + 1e-5) * sd["bn.weight"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    back = interop.to_torch_state_dict(params, stats)
    assert list(back) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)
