"""bnjax.interop: torch state_dict <-> (params, batch_stats), without (and with) torch."""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import small_net

import bnjax
from bnjax import interop
from bnjax.interop import from_torch_state_dict, to_torch_state_dict


def _bn_sd(prefix: str, c: int, rng: np.random.Generator, count: int = 3) -> dict:
    return {
        f"{prefix}weight": rng.standard_normal(c).astype(np.float32),
        f"{prefix}bias": rng.standard_normal(c).astype(np.float32),
        f"{prefix}running_mean": rng.standard_normal(c).astype(np.float32),
        f"{prefix}running_var": rng.uniform(0.5, 2, c).astype(np.float32),
        f"{prefix}num_batches_tracked": np.array(count, np.int64),
    }


def _resnetish_sd() -> dict[str, np.ndarray]:
    """A state_dict shaped like a small ResNet's: nested paths, conv, BN, linear."""
    rng = np.random.default_rng(0)
    sd = {"conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32)}
    sd.update(_bn_sd("bn1.", 8, rng))
    sd["layer1.0.conv1.weight"] = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    sd.update(_bn_sd("layer1.0.bn1.", 8, rng, count=7))
    sd["layer1.0.downsample.0.weight"] = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    sd.update(_bn_sd("layer1.0.downsample.1.", 8, rng))
    sd["seq.conv1d.weight"] = rng.standard_normal((5, 8, 3)).astype(np.float32)
    sd["seq.conv3d.weight"] = rng.standard_normal((2, 5, 1, 2, 3)).astype(np.float32)
    sd["embed.weight"] = rng.standard_normal((11, 8)).astype(np.float32)
    sd["fc.weight"] = rng.standard_normal((10, 8)).astype(np.float32)
    sd["fc.bias"] = rng.standard_normal(10).astype(np.float32)
    sd["half.weight"] = rng.standard_normal(4).astype(np.float16)
    return sd


def _assert_sd_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------------- structure


def test_nested_trees_keyed_by_module_path():
    sd = _resnetish_sd()
    params, stats = from_torch_state_dict(sd, keep_torch_layout=["embed"])
    assert sorted(stats) == ["bn1", "layer1"]
    assert sorted(stats["layer1"]["0"]) == ["bn1", "downsample"]
    assert sorted(stats["layer1"]["0"]["downsample"]) == ["1"]
    assert sorted(params["layer1"]["0"]["bn1"]) == ["bias", "weight"]
    assert sorted(stats["bn1"]) == ["num_batches_tracked", "running_mean", "running_var"]
    assert stats["layer1"]["0"]["bn1"]["num_batches_tracked"].dtype == np.int32
    assert int(stats["layer1"]["0"]["bn1"]["num_batches_tracked"]) == 7
    # The BN subtrees are exactly what bnjax.apply takes.
    x = jnp.ones((2, 4, 4, 8))
    y, new = bnjax.apply(params["bn1"], stats["bn1"], x, train=True)
    assert int(new["num_batches_tracked"]) == 4 and y.shape == x.shape


def test_default_layouts_are_jax_layouts():
    sd = _resnetish_sd()
    params, _ = from_torch_state_dict(sd, keep_torch_layout=["embed"])
    np.testing.assert_array_equal(
        params["conv1"]["weight"], np.transpose(sd["conv1.weight"], (2, 3, 1, 0))
    )
    np.testing.assert_array_equal(
        params["seq"]["conv1d"]["weight"], np.transpose(sd["seq.conv1d.weight"], (2, 1, 0))
    )
    np.testing.assert_array_equal(
        params["seq"]["conv3d"]["weight"],
        np.transpose(sd["seq.conv3d.weight"], (2, 3, 4, 1, 0)),
    )
    np.testing.assert_array_equal(params["fc"]["weight"], sd["fc.weight"].T)
    np.testing.assert_array_equal(params["embed"]["weight"], sd["embed.weight"])  # kept
    np.testing.assert_array_equal(params["bn1"]["weight"], sd["bn1.weight"])  # 1-D
    assert params["half"]["weight"].dtype == np.float16
    for leaf in jax.tree.leaves(params):
        assert leaf.flags.c_contiguous


def test_torch_layouts_when_asked():
    sd = _resnetish_sd()
    params, _ = from_torch_state_dict(sd, conv_layout="OIHW", linear_layout="out_in")
    np.testing.assert_array_equal(params["conv1"]["weight"], sd["conv1.weight"])
    np.testing.assert_array_equal(params["fc"]["weight"], sd["fc.weight"])
    np.testing.assert_array_equal(params["embed"]["weight"], sd["embed.weight"])


def test_hwio_kernel_computes_torch_conv():
    """The converted kernel in NHWC/HWIO gives the NCHW/OIHW correlation (float64 loop)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3))
    x = rng.standard_normal((2, 3, 5, 5))
    expected = np.zeros((2, 4, 3, 3))
    for i in range(3):
        for j in range(3):
            expected[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i : i + 3, j : j + 3], w)
    params, _ = from_torch_state_dict({"conv.weight": w})
    y = jax.lax.conv_general_dilated(
        jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32),
        jnp.asarray(params["conv"]["weight"], jnp.float32),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    # float32 sums of 27 O(1) products: a few ulps, far below any layout mistake (O(1)).
    np.testing.assert_allclose(np.transpose(np.asarray(y), (0, 3, 1, 2)), expected, atol=1e-5)


def test_affine_false_and_untracked_batchnorms():
    rng = np.random.default_rng(2)
    sd = {k: v for k, v in _bn_sd("a.", 3, rng).items() if not k.endswith(("weight", "bias"))}
    sd.update({k: v for k, v in _bn_sd("b.", 3, rng).items() if k.endswith(("weight", "bias"))})
    params, stats = from_torch_state_dict(sd)
    assert "a" not in params and sorted(stats) == ["a"]
    assert sorted(params) == ["b"] and "b" not in stats
    back = to_torch_state_dict(params, stats)
    assert sorted(back) == sorted(sd)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "layouts",
    [{}, {"conv_layout": "OIHW", "linear_layout": "out_in"}, {"keep_torch_layout": ["embed"]}],
    ids=["jax", "torch", "keep-embed"],
)
def test_round_trip_is_bit_exact(layouts):
    sd = _resnetish_sd()
    original = copy.deepcopy(sd)
    params, stats = from_torch_state_dict(sd, **layouts)
    back = to_torch_state_dict(params, stats, **layouts)
    _assert_sd_identical(back, sd)  # torch's key order too
    assert back["bn1.num_batches_tracked"].dtype == np.int64
    _assert_sd_identical(sd, original)  # the input is untouched
    for k in sd:
        assert not np.shares_memory(back[k], sd[k])
    for leaf in jax.tree.leaves((params, stats)):
        assert not any(np.shares_memory(leaf, v) for v in sd.values())


def test_round_trip_through_jax_arrays_and_small_net():
    from test_torch_equivalence import _load, _sub

    _, arrays = _load("c_accumulation.npz")
    sd = _sub(arrays, "sd_final")
    params, stats = small_net.from_torch_state_dict(sd)  # jnp arrays, keys re-sorted by jax
    assert params["conv1"]["weight"].shape == (3, 3, 1, 4)
    assert params["fc"]["weight"].shape == (8, 10)
    back = interop.to_torch_state_dict(params, stats, reference=sd)  # reference's key order
    _assert_sd_identical(back, sd)


def test_bfloat16_arrays_round_trip():
    w = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    params, _ = from_torch_state_dict({"fc.weight": w})
    assert params["fc"]["weight"].dtype == ml_dtypes.bfloat16
    back = to_torch_state_dict(params, {})
    assert back["fc.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["fc.weight"].view(np.uint16), w.view(np.uint16))


# --------------------------------------------------------------------------- duck typing


class _FakeTensor:
    """Looks like a torch tensor: detach().cpu().numpy()."""

    def __init__(self, a):
        self.a = a
        self.calls = []

    def detach(self):
        self.calls.append("detach")
        return self

    def cpu(self):
        self.calls.append("cpu")
        return self

    def numpy(self):
        self.calls.append("numpy")
        return self.a


class _ArrayLike:
    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.a, dtype)


def test_accepts_tensor_like_and_array_like_values():
    fake = _FakeTensor(np.ones((2, 3), np.float32))
    params, stats = from_torch_state_dict(
        {
            "fc.weight": fake,
            "fc.bias": _ArrayLike([1.0, 2.0]),
            "bn.running_mean": jnp.zeros(3),
            "bn.running_var": [1.0, 1.0, 1.0],
            "bn.num_batches_tracked": 5,
        }
    )
    assert fake.calls == ["detach", "cpu", "numpy"]
    assert params["fc"]["weight"].shape == (3, 2)
    np.testing.assert_array_equal(params["fc"]["bias"], [1.0, 2.0])
    assert stats["bn"]["num_batches_tracked"].dtype == np.int32


# --------------------------------------------------------------------------- errors


def test_expected_lists_missing_extra_and_misshaped_keys():
    sd = _resnetish_sd()
    params, stats = from_torch_state_dict(sd)
    exp_params = copy.deepcopy(params)
    del exp_params["fc"]["bias"]  # -> extra in the state_dict
    exp_params["new"] = {"weight": np.zeros(3)}  # -> missing from the state_dict
    exp_params["conv1"]["weight"] = np.zeros((3, 3, 3, 9))  # -> mis-shaped
    with pytest.raises(ValueError) as err:
        from_torch_state_dict(sd, expected=(exp_params, stats))
    msg = str(err.value)
    assert "missing keys: ['new.weight']" in msg
    assert "extra keys: ['fc.bias']" in msg
    assert "conv1.weight: (3, 3, 3, 8) vs expected (3, 3, 3, 9)" in msg
    # And a matching template passes.
    from_torch_state_dict(sd, expected=(params, stats))


def test_reference_lists_missing_extra_and_misshaped_keys():
    sd = _resnetish_sd()
    params, stats = from_torch_state_dict(sd)
    ref = dict(sd)
    ref["extra.weight"] = np.zeros(2)
    del ref["fc.bias"]
    ref["fc.weight"] = np.zeros((10, 9))
    with pytest.raises(ValueError) as err:
        to_torch_state_dict(params, stats, reference=ref)
    msg = str(err.value)
    assert "missing keys: ['extra.weight']" in msg
    assert "extra keys: ['fc.bias']" in msg
    assert "fc.weight: (10, 8) vs reference (10, 9)" in msg


@pytest.mark.parametrize(
    "sd,error,match",
    [
        ({"bn.running_mean": np.zeros(3)}, ValueError, "bn.*running_var"),
        (
            {
                "bn.running_mean": np.zeros(3),
                "bn.running_var": np.ones(3),
                "bn.num_batches_tracked": np.array(2**31, np.int64),
            },
            ValueError,
            "int32",
        ),
        (
            {
                "bn.running_mean": np.zeros(3),
                "bn.running_var": np.ones(3),
                "bn.num_batches_tracked": np.array(1.5),
            },
            ValueError,
            "non-negative integer scalar",
        ),
        ({1: np.zeros(3)}, TypeError, "keys must be strings"),
        ({"a..weight": np.zeros(3)}, ValueError, "malformed"),
        (
            {"a.weight": np.zeros(3), "a.weight.x": np.zeros(3)},
            ValueError,
            "both a module and a leaf",
        ),
        ({"a.weight": object()}, TypeError, re.escape("state_dict['a.weight']")),
    ],
    ids=[
        "incomplete-bn",
        "count-overflow",
        "count-float",
        "int-key",
        "empty-part",
        "clash",
        "object",
    ],
)
def test_bad_state_dicts_raise_clearly(sd, error, match):
    with pytest.raises(error, match=match):
        from_torch_state_dict(sd)


def test_bad_options_and_trees_raise_clearly():
    with pytest.raises(ValueError, match="conv_layout"):
        from_torch_state_dict({}, conv_layout="NHWC")
    with pytest.raises(ValueError, match="linear_layout"):
        to_torch_state_dict({}, {}, linear_layout="io")
    with pytest.raises(TypeError, match="mapping"):
        from_torch_state_dict([("a.weight", np.zeros(2))])
    with pytest.raises(TypeError, match="collection of module paths"):
        from_torch_state_dict({}, keep_torch_layout="embed")
    with pytest.raises(ValueError, match="both params and batch_stats"):
        to_torch_state_dict(
            {"bn": {"running_mean": np.zeros(2)}}, {"bn": {"running_mean": np.zeros(2)}}
        )
    with pytest.raises(ValueError, match="bad key"):
        to_torch_state_dict({"a.b": {"weight": np.zeros(2)}}, {})


# --------------------------------------------------------------------------- with torch


@pytest.mark.torch
def test_real_torch_model_round_trip():
    torch = pytest.importorskip("torch", reason="torch is not installed (optional check)")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv1d(4, 2, 1), nn.BatchNorm1d(2)),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.Embedding(7, 3),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].num_batches_tracked.fill_(9)
    sd = model.state_dict()
    params, stats = from_torch_state_dict(sd, keep_torch_layout=["6"])
    assert params["0"]["weight"].shape == (3, 3, 3, 4)
    assert params["5"]["weight"].shape == (4, 5)
    assert params["6"]["weight"].shape == (7, 3)
    assert sorted(stats) == ["1", "3"] and sorted(stats["3"]) == ["1"]
    back = to_torch_state_dict(params, stats, keep_torch_layout=["6"], reference=sd)
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert v.dtype == sd[k].dtype, k
        assert torch.equal(v, sd[k]), k

    bf = torch.randn(3, 4).to(torch.bfloat16)
    p_bf, _ = from_torch_state_dict({"fc.weight": bf}, linear_layout="out_in")
    assert p_bf["fc"]["weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(p_bf["fc"]["weight"].view(np.int16), bf.view(torch.int16).numpy())
