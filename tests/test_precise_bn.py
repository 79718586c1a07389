"""Precise BN: update_bn (equal weight per batch, PyTorch's) and precise_bn (pooled)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import ref_batchnorm, ref_moments

import bnjax
from bnjax.deploy import precise_bn, update_bn

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "precise_bn_update_bn.npz"
EXPORTER = ROOT / "scripts" / "export_precise_bn_fixture.py"
TOL = dict(rtol=2e-5, atol=1e-6)
# Exact float32 products: GPUs otherwise use TF32 passes for float32 convs and matmuls.
HI = jax.lax.Precision.HIGHEST

# --- an MLP on (N, L, 5): bn1 over the input (n = N * L per batch) - dense - relu - bn2.

BN_CUMULATIVE = functools.partial(bnjax.apply, momentum=None)


def _mlp_init():
    rng = np.random.default_rng(0)
    p1, s1 = bnjax.init(5)
    p2, s2 = bnjax.init(4)
    params = {
        "bn1": {"weight": jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32), "bias": p1["bias"]},
        "dense": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
        "bn2": p2,
    }
    # Stale statistics, which both helpers must discard.
    s1 = dict(s1, running_mean=s1["running_mean"] + 3.0, num_batches_tracked=jnp.int32(9))
    return params, {"bn1": s1, "bn2": s2}


def _mlp(params, stats, x, bn=BN_CUMULATIVE):
    h, s1 = bn(params["bn1"], stats["bn1"], x, True)
    h = jax.nn.relu(jnp.dot(h, params["dense"]["kernel"], precision=HI))
    h, s2 = bn(params["bn2"], stats["bn2"], h, True)
    return h, {"bn1": s1, "bn2": s2}


def _mlp_batches():
    rng = np.random.default_rng(1)
    # Unequal sizes and shifted means: the equal-weight and pooled answers differ.
    return [
        jnp.asarray(rng.normal(size=(n, 3, 5)) * (1 + i) + i, jnp.float32)
        for i, n in enumerate((6, 6, 6, 2))
    ]


def _numpy_bn_inputs(params, batches):
    """Each BatchNorm's input per batch, by a float64 NumPy training-mode forward."""
    ins = {"bn1": [], "bn2": []}
    for x in batches:
        x = np.asarray(x, np.float64)
        ins["bn1"].append(x.reshape(-1, 5))
        h, _ = ref_batchnorm(x, params["bn1"]["weight"], params["bn1"]["bias"], None, train=True)
        h = np.maximum(h @ np.asarray(params["dense"]["kernel"], np.float64), 0)
        ins["bn2"].append(h.reshape(-1, 4))
    return ins


def _equal_weight(xs):
    means, uvars = [], []
    for x in xs:
        mean, var, n = ref_moments(x, (-1,))
        means.append(mean)
        uvars.append(var * n / (n - 1))
    return np.mean(means, axis=0), np.mean(uvars, axis=0)


def _pooled(xs):
    mean, var, n = ref_moments(np.concatenate(xs), (-1,))
    return mean, var * n / (n - 1)


def test_update_bn_equals_numpy_equal_weight():
    params, stats = _mlp_init()
    batches = _mlp_batches()
    new = update_bn(lambda p, s, x: _mlp(p, s, x)[1], params, stats, batches, progress=False)
    ins = _numpy_bn_inputs(params, batches)
    for name in ("bn1", "bn2"):
        mean, var = _equal_weight(ins[name])
        np.testing.assert_allclose(new[name]["running_mean"], mean, **TOL)
        np.testing.assert_allclose(new[name]["running_var"], var, **TOL)
        assert int(new[name]["num_batches_tracked"]) == len(batches)
    assert int(stats["bn1"]["num_batches_tracked"]) == 9  # the caller's tree is untouched


@pytest.mark.parametrize("pooled", [True, False])
def test_precise_bn_equals_numpy(pooled):
    params, stats = _mlp_init()
    batches = _mlp_batches()
    new = precise_bn(
        _mlp, params, stats, iter(batches),
        pooled=pooled, progress=False,
    )  # fmt: skip
    ins = _numpy_bn_inputs(params, batches)
    for name in ("bn1", "bn2"):
        mean, var = (_pooled if pooled else _equal_weight)(ins[name])
        np.testing.assert_allclose(new[name]["running_mean"], mean, **TOL)
        np.testing.assert_allclose(new[name]["running_var"], var, **TOL)
        assert new[name]["running_var"].dtype == jnp.float32
        assert int(new[name]["num_batches_tracked"]) == len(batches)
    # The two variants are not the same thing on these batches.
    eq_mean, _ = _equal_weight(ins["bn1"])
    pool_mean, _ = _pooled(ins["bn1"])
    assert np.max(np.abs(eq_mean - pool_mean)) > 0.1


def test_precise_bn_counts_only_valid_values_under_a_mask():
    rng = np.random.default_rng(5)
    p, s = bnjax.init(3)
    batches = [
        (jnp.asarray(rng.normal(size=(4, 6, 3)) + i, jnp.float32), jnp.asarray(m))
        for i, m in enumerate(rng.random((3, 4, 6)) < 0.6)
    ]

    def apply_fn(params, stats, batch, bn):
        x, mask = batch
        y, new = bn(params["bn"], stats["bn"], x, True, mask=mask)
        return y, {"bn": new}

    new = precise_bn(apply_fn, {"bn": p}, {"bn": s}, batches, progress=False)
    valid = np.concatenate([np.asarray(x)[np.asarray(m)] for x, m in batches])
    mean, var = _pooled([valid])
    np.testing.assert_allclose(new["bn"]["running_mean"], mean, **TOL)
    np.testing.assert_allclose(new["bn"]["running_var"], var, **TOL)


def test_num_batches_bounds_the_stream():
    params, stats = _mlp_init()
    batches = _mlp_batches()
    new = update_bn(
        lambda p, s, x: _mlp(p, s, x)[1], params, stats, iter(batches), num_batches=2,
        progress=True,  # the bar goes to stderr; it must not break anything
    )  # fmt: skip
    mean, _ = _equal_weight(_numpy_bn_inputs(params, batches[:2])["bn1"])
    np.testing.assert_allclose(new["bn1"]["running_mean"], mean, **TOL)
    assert int(new["bn1"]["num_batches_tracked"]) == 2


def test_update_bn_rejects_a_fixed_momentum_and_precise_bn_misuse():
    params, stats = _mlp_init()
    batches = _mlp_batches()
    with pytest.raises(ValueError, match="momentum=None"):
        update_bn(
            lambda p, s, x: _mlp(p, s, x, bn=bnjax.apply)[1], params, stats, batches,
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="no batch"):
        update_bn(lambda p, s, x: _mlp(p, s, x)[1], params, stats, [], progress=False)

    def skips_bn2(p, s, x, bn):
        y, s1 = bn(p["bn1"], s["bn1"], x, True)
        return y, {"bn1": s1, "bn2": s["bn2"]}

    with pytest.raises(ValueError, match=r"\['bn2'\] was never run through `bn`"):
        precise_bn(skips_bn2, params, stats, batches, progress=False)

    def eval_mode(p, s, x, bn):
        return x, {"bn1": bn(p["bn1"], s["bn1"], x, False)[1], "bn2": s["bn2"]}

    with pytest.raises(ValueError, match="training mode"):
        precise_bn(eval_mode, params, stats, batches, progress=False)


# --- PyTorch's torch.optim.swa_utils.update_bn, via the committed fixture.


def _torch_cnn(params, stats, x, bn):
    """The fixture's CNN, NHWC, with torch's state_dict names."""

    def conv(w, b, h):
        y = jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HI
        )
        return y + b

    h = conv(params["conv1"]["kernel"], params["conv1"]["bias"], x)
    h, s1 = bn(params["bn1"], stats["bn1"], h, True)
    h = conv(params["conv2"]["kernel"], params["conv2"]["bias"], jax.nn.relu(h))
    h, s2 = bn(params["bn2"], stats["bn2"], h, True)
    return h, {"bn1": s1, "bn2": s2}


def _load_fixture():
    d = np.load(FIXTURE)
    meta = json.loads(str(d["__meta__"]))
    before = {k[len("before/") :]: d[k] for k in d.files if k.startswith("before/")}
    after = {k[len("after/") :]: d[k] for k in d.files if k.startswith("after/")}
    batches = [
        jnp.asarray(d[f"batch_{i}"].transpose(0, 2, 3, 1))
        for i in range(len(meta["config"]["batch_sizes"]))
    ]
    params = {
        c: {"kernel": jnp.asarray(before[f"{c}.weight"].transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(before[f"{c}.bias"])}
        for c in ("conv1", "conv2")
    }  # fmt: skip
    stats = {}
    for b in ("bn1", "bn2"):
        params[b] = {k: jnp.asarray(before[f"{b}.{k}"]) for k in ("weight", "bias")}
        stats[b] = {
            "running_mean": jnp.asarray(before[f"{b}.running_mean"]),
            "running_var": jnp.asarray(before[f"{b}.running_var"]),
            "num_batches_tracked": jnp.asarray(before[f"{b}.num_batches_tracked"], jnp.int32),
        }
    return meta, params, stats, batches, after


def test_matches_torch_update_bn_fixture():
    meta, params, stats, batches, after = _load_fixture()
    assert meta["torch_version"].startswith("2.13.0")
    via_update_bn = update_bn(
        lambda p, s, x: _torch_cnn(p, s, x, BN_CUMULATIVE)[1], params, stats, batches,
        progress=False,
    )  # fmt: skip
    via_precise = precise_bn(_torch_cnn, params, stats, batches, pooled=False, progress=False)
    for new in (via_update_bn, via_precise):
        for b in ("bn1", "bn2"):
            for k in ("running_mean", "running_var"):
                np.testing.assert_allclose(new[b][k], after[f"{b}.{k}"], **TOL)
            assert int(new[b]["num_batches_tracked"]) == int(after[f"{b}.num_batches_tracked"])
    # PyTorch's update_bn is the equal-weight variant: the pooled one differs here.
    pooled = precise_bn(_torch_cnn, params, stats, batches, pooled=True, progress=False)
    assert not np.allclose(pooled["bn1"]["running_var"], after["bn1.running_var"], rtol=1e-3)


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.torch
def test_fixture_exporter_reproduces_the_fixture(tmp_path):
    torch = pytest.importorskip("torch", reason="re-running the fixture exporter needs torch")
    exported_with = json.loads(str(np.load(FIXTURE)["__meta__"]))["torch_version"]
    if torch.__version__ != exported_with:
        pytest.skip(
            f"the fixture was exported with torch {exported_with}, this is {torch.__version__}"
        )
    out = tmp_path / "again.npz"
    subprocess.run([sys.executable, str(EXPORTER), "--out", str(out)], check=True, cwd=ROOT)
    old, new = np.load(FIXTURE), np.load(out)
    assert sorted(old.files) == sorted(new.files)
    for k in old.files:
        np.testing.assert_array_equal(old[k], new[k], err_msg=k)
