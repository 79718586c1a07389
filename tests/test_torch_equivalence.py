"""bnjax against real PyTorch runs: the committed fixtures in `tests/fixtures/*.npz`.

The fixtures are written by `scripts/export_torch_fixtures.py` (torch==2.13.0, CPU);
these tests need no torch. Each scenario is reproduced with `bnjax.apply` (scenarios a,
b, e) or with the JAX port of the fixture's net in `small_net.py` and
`bnjax.interop` (scenarios c, d), and compared with `bnjax.testing.assert_trees_close`
(which names the worst element of every leaf when a comparison fails).
Run with `-s` to print the largest absolute difference seen per scenario.

Tolerances (float32; eps_f32 = 2**-23 ~ 1.2e-7). The -s output prints, per scenario,
the largest absolute difference and the largest share of the tolerance used.
- Outputs, input gradients, running statistics (a, b, e's float32 parts): torch and
  bnjax sum the batch in different orders and with different variance formulas
  (bnjax: shifted one pass; torch CPU: its own kernels), so mean and var differ by a
  few ulps of the data. The
  inputs have |mean| / std up to ~20 on purpose, so `x - mean` loses ~4 bits and
  y = (x - mean) * rsqrt(var + eps) * w + b differs by up to ~2e-6 for O(1) values
  (measured); the running statistics compound that over 5 steps. rtol = atol = 1e-5
  (~80 ulps) keeps a ~5x margin over what is measured while still catching any wrong
  formula (biased-vs-unbiased var is ~1e-1 here, a wrong momentum ~1e-2).
- dweight and dbias are sums over the n <= 50 values of a feature with cancellation
  (sum g * xhat), so their absolute error scales with sum |g * xhat| ~ n, not with
  the (sometimes ~1e-2) result: atol = 5e-5, rtol = 1e-5 (measured up to ~5e-6).
- The small net (c, d): convolutions, a matmul and SGD with momentum over 3-4 steps;
  measured differences are ~2e-7, so the float32 tolerance 1e-5 applies as is.
- bfloat16 (e): y and dx are rounded to bfloat16 (8 significant bits, ulp = 2**-7
  relative to the leading power of two) by both frameworks from float32 intermediates
  that differ in the last bits, so a value may round one bf16 ulp apart:
  rtol = atol = 2**-7 ~ 7.8e-3 for the bf16 outputs (one ulp is 2**-7 |y| at most).
  dweight/dbias and the running statistics are float32 in both and keep the float32
  tolerances.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_net
from conftest import fixture_arrays

import bnjax
from bnjax import interop, testing

FIXTURES = Path(__file__).parent / "fixtures"
EXPORTER = Path(__file__).parent.parent / "scripts" / "export_torch_fixtures.py"
F32 = {"rtol": 1e-5, "atol": 1e-5}
F32_PARAM_GRADS = {"rtol": 1e-5, "atol": 5e-5}
BF16 = {"rtol": 2.0**-7, "atol": 2.0**-7}

#: The files `scripts/export_torch_fixtures.py` writes.
MY_FIXTURES = (
    *(f"a_grid_{k}.npz" for k in ("bn1d_nc", "bn1d_ncl", "bn2d", "bn3d")),
    "b_walkthrough.npz",
    "c_accumulation.npz",
    "d_frozen_bn.npz",
    "e_bf16.npz",
)
MAX_DIFF: dict[str, float] = {}  # scenario -> largest |actual - expected|
TOL_USED: dict[
    str, float
] = {}  # scenario -> largest |actual - expected| / (atol + rtol |expected|)


# --------------------------------------------------------------------------- helpers


@functools.cache
def _load(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A grid fixture of scripts/export_torch_fixtures.py (not an `export_fixture` file)."""
    arrays = fixture_arrays(name)
    return json.loads(str(arrays.pop("__meta__"))), arrays


def _sub(arrays: dict[str, np.ndarray], prefix: str, index: int | None = None) -> dict:
    """{prefix/k: a} -> {k: a[index]} (a flat torch state_dict, or per-step arrays)."""
    n = len(prefix) + 1
    out = {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
    return out if index is None else {k: v[index] for k, v in out.items()}


def _close(scenario: str, actual, expected, tol: dict) -> None:
    """`bnjax.testing.assert_trees_close`, recording the largest difference per scenario."""
    report = testing.assert_trees_close(actual, expected, **tol)
    MAX_DIFF[scenario] = max(MAX_DIFF.get(scenario, 0.0), report.max_abs_diff)
    used = max((leaf.tol_used for leaf in report.leaves), default=0.0)
    TOL_USED[scenario] = max(TOL_USED.get(scenario, 0.0), used)


def _stats_equal_count(actual: dict, expected: dict) -> None:
    """num_batches_tracked is an exact integer (int32 in bnjax, int64 in torch)."""
    a, e = actual.get("num_batches_tracked"), expected.get("num_batches_tracked")
    assert (a is None) == (e is None)
    if a is not None:
        assert np.asarray(a).dtype == np.int32
        np.testing.assert_array_equal(np.asarray(a), e)


@pytest.fixture(scope="module", autouse=True)
def _report_max_diffs():
    yield
    if MAX_DIFF:
        print("\nscenario        largest |bnjax - torch|   share of the tolerance used")
        for k in sorted(MAX_DIFF):
            print(f"  {k:<14s} {MAX_DIFF[k]:>12.3e}   {TOL_USED[k]:>12.3f}")


def _bn_step(params, batch_stats, x, g, *, train, momentum, eps):
    """One BatchNorm call on NC... inputs: y, new stats, and the vjp with upstream g."""

    def f(p, x_):
        return bnjax.apply(p, batch_stats, x_, train, momentum=momentum, eps=eps, axis=1)

    (y, new_stats), vjp = jax.vjp(f, params, x)
    zero_stats = jax.tree.map(jnp.zeros_like, new_stats)
    dparams, dx = vjp((g, zero_stats))
    return y, new_stats, dx, dparams


_BN_STEP = {
    False: _bn_step,
    True: jax.jit(_bn_step, static_argnames=("train", "momentum", "eps")),
}


def _replay_eager(params, stats, xs, gs, *, trains, momentum, eps):
    """`_bn_step` once per step, op by op; outputs stacked over steps."""
    outs = []
    for s, train in enumerate(trains):
        y, stats, dx, dparams = _bn_step(
            params, stats, xs[s], gs[s], train=train, momentum=momentum, eps=eps
        )
        outs.append((y, dx, dparams, stats))
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)


@functools.partial(jax.jit, static_argnames=("trains", "momentum", "eps"))
def _replay_jit(params, stats, xs, gs, *, trains, momentum, eps):
    """The same, one jit per configuration: a `lax.scan` per run of equal train flags."""
    outs, start = [], 0
    for train, run in itertools.groupby(trains):
        n = len(list(run))

        def body(st, xg, train=train):
            y, st, dx, dparams = _bn_step(
                params, st, xg[0], xg[1], train=train, momentum=momentum, eps=eps
            )
            return st, (y, dx, dparams, st)

        stats, out = jax.lax.scan(body, stats, (xs[start : start + n], gs[start : start + n]))
        outs.append(out)
        start += n
    return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def _run_bn_steps(scenario, arrays, cfg_prefix, *, momentum, eps, x_dtype, tol_y, use_jit):
    """Replays `<cfg>/...` steps from `<cfg>/sd0` and compares every step."""
    params, stats = interop.from_torch_state_dict(_sub(arrays, f"{cfg_prefix}sd0"))
    trains = tuple(bool(t) for t in arrays[f"{cfg_prefix}train"])
    xs = jnp.asarray(arrays[f"{cfg_prefix}x"], x_dtype)
    gs = jnp.asarray(arrays[f"{cfg_prefix}g"], x_dtype)
    replay = _replay_jit if use_jit else _replay_eager
    ys, dxs, dparams, step_stats = replay(
        params, stats, xs, gs, trains=trains, momentum=momentum, eps=eps
    )
    assert ys.dtype == x_dtype and dxs.dtype == x_dtype
    _close(
        scenario,
        {"y": ys, "dx": dxs},
        {"y": arrays[f"{cfg_prefix}y"], "dx": arrays[f"{cfg_prefix}dx"]},
        tol_y,
    )
    if params:
        _close(
            scenario,
            dparams,
            {"weight": arrays[f"{cfg_prefix}dweight"], "bias": arrays[f"{cfg_prefix}dbias"]},
            F32_PARAM_GRADS,
        )
    for s in range(len(trains)):
        stats = jax.tree.map(lambda a, s=s: a[s], step_stats)
        exp_params, exp_stats = interop.from_torch_state_dict(_sub(arrays, f"{cfg_prefix}sd", s))
        chex.assert_trees_all_equal_structs(stats, exp_stats)
        _close(scenario, (params, stats), (exp_params, exp_stats), F32)
        _stats_equal_count(stats, exp_stats)


# --------------------------------------------------------------------------- scenario a


def _grid_cases():
    cases = []
    for path in sorted(FIXTURES / n for n in MY_FIXTURES if n.startswith("a_grid_")):
        meta, _ = _load(path.name)
        cases += [
            pytest.param(path.name, c, id=f"{meta['kind']}-{c['id']}") for c in meta["configs"]
        ]
    return cases


@pytest.mark.parametrize("fname,cfg", _grid_cases())
def test_a_grid(fname, cfg):
    meta, arrays = _load(fname)
    assert meta["scenario"] == "a"
    # One jit per configuration (all of its steps); scenarios b and e also run eagerly.
    _run_bn_steps(
        "a_grid",
        arrays,
        cfg["id"] + "/",
        momentum=cfg["momentum"],
        eps=cfg["eps"],
        x_dtype=jnp.float32,
        tol_y=F32,
        use_jit=True,
    )


def test_a_grid_covers_the_issue():
    """The grid is the one the issue asks for: 4 input kinds x 2 x 2 x 3 x 2 configs."""
    seen = set()
    for path in sorted(FIXTURES / n for n in MY_FIXTURES if n.startswith("a_grid_")):
        meta, arrays = _load(path.name)
        for c in meta["configs"]:
            seen.add(
                (
                    c["module"],
                    len(c["input_shape"]),
                    c["affine"],
                    c["track_running_stats"],
                    c["momentum"],
                    c["eps"],
                )
            )
            assert c["train_steps"] >= 5 and c["eval_steps"] >= 1
            x = arrays[c["id"] + "/x"]  # (steps, N, C, ...)
            channel_means = x.mean(axis=tuple(a for a in range(x.ndim) if a != 2))
            assert np.abs(channel_means).max() > 1.0  # inputs with a non-zero mean
            if c["affine"]:
                w = arrays[c["id"] + "/sd0/weight"]
                assert not np.allclose(w, 1.0)  # non-trivial weight
    assert len(seen) == 4 * 2 * 2 * 3 * 2


# --------------------------------------------------------------------------- scenario b


def _compare_b_case(a, cid, y, dx, dparams):
    _close("b_walkthrough", {"y": y, "dx": dx}, {"y": a[f"{cid}/y"], "dx": a[f"{cid}/dx"]}, F32)
    _close(
        "b_walkthrough",
        {"weight": dparams["weight"], "bias": dparams["bias"]},
        {"weight": a[f"{cid}/dweight"], "bias": a[f"{cid}/dbias"]},
        F32_PARAM_GRADS,
    )


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_b_walkthrough(use_jit):
    _bn_step = _BN_STEP[use_jit]
    meta, a = _load("b_walkthrough.npz")
    params, stats = interop.from_torch_state_dict(_sub(a, "sd0"))
    y, stats, dx, dparams = _bn_step(
        params,
        stats,
        jnp.asarray(a["train/x"]),
        jnp.asarray(a["train/g"]),
        train=True,
        momentum=0.1,
        eps=1e-5,
    )
    _compare_b_case(a, "train", y, dx, dparams)
    exp_params, exp_stats = interop.from_torch_state_dict(_sub(a, "sd1"))
    _close("b_walkthrough", (params, stats), (exp_params, exp_stats), F32)
    _stats_equal_count(stats, exp_stats)

    y1, same_stats, dx1, _ = _bn_step(
        params,
        stats,
        jnp.asarray(a["eval_ones/x"]),
        jnp.ones((1, 3, 1, 1)),
        train=False,
        momentum=0.1,
        eps=1e-5,
    )
    _close(
        "b_walkthrough", {"y": y1, "dx": dx1}, {"y": a["eval_ones/y"], "dx": a["eval_ones/dx"]}, F32
    )
    chex.assert_trees_all_equal(same_stats, stats)

    first_rows = {}
    for case in meta["cases"]:
        cid = case["id"]
        y, new_stats, dx, dparams = _bn_step(
            params,
            stats,
            jnp.asarray(a[f"{cid}/x"]),
            jnp.asarray(a[f"{cid}/g"]),
            train=case["train"],
            momentum=0.1,
            eps=1e-5,
        )
        _compare_b_case(a, cid, y, dx, dparams)
        exp_params, exp_stats = interop.from_torch_state_dict(_sub(a, f"{cid}/sd"))
        _close("b_walkthrough", (params, new_stats), (exp_params, exp_stats), F32)
        _stats_equal_count(new_stats, exp_stats)
        first_rows[(case["batch_size"], case["train"])] = np.asarray(y[0])
    # The trap: in train mode sample 0's output depends on the rest of the batch; in eval
    # mode it does not (bit for bit).
    assert not np.allclose(first_rows[(1, True)], first_rows[(8, True)], atol=1e-3)
    for bs in (2, 8):
        np.testing.assert_array_equal(first_rows[(bs, False)], first_rows[(1, False)])


# --------------------------------------------------------------------------- scenario c


def _torch_sgd_momentum(params, buf, grads, lr, momentum):
    """One `torch.optim.SGD(lr, momentum)` step (dampening 0, no Nesterov, no decay).

    torch keeps `buf = g` on the first step, then `buf = momentum * buf + g`, and
    updates `p -= lr * buf`. Returns the new `(params, buf)`.
    """
    buf = grads if buf is None else jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
    return jax.tree.map(lambda p, b: p - lr * b, params, buf), buf


def test_c_gradient_accumulation():
    meta, a = _load("c_accumulation.npz")
    cfg = meta["config"]
    accum, mb, lr, mom = cfg["accum_steps"], cfg["micro_batch"], cfg["lr"], cfg["momentum"]
    assert cfg["backward"] == "(loss / accum_steps).backward() per micro-batch"
    params, stats = small_net.from_torch_state_dict(_sub(a, "sd_init"))
    x, y = small_net.nchw_to_nhwc(a["x"]), jnp.asarray(a["y"], jnp.int32)
    value_and_grad = jax.jit(jax.value_and_grad(small_net.loss_fn, has_aux=True))
    buf = None
    for step in range(cfg["optimizer_steps"]):
        acc = jax.tree.map(jnp.zeros_like, params)
        for micro in range(accum):
            k = step * accum + micro
            batch = (x[k * mb : (k + 1) * mb], y[k * mb : (k + 1) * mb])
            (loss, (stats, aux)), grads = value_and_grad(params, stats, batch)
            # torch: (loss / accum).backward() accumulates into .grad
            acc = jax.tree.map(lambda s, g_: s + g_ / accum, acc, grads)
            _close(
                "c_accumulation",
                {"loss": loss, "logits": aux["logits"]},
                {"loss": a["loss"][k], "logits": a["logits"][k]},
                F32,
            )
            _, exp_stats = interop.from_torch_state_dict(_sub(a, "sd_micro", k))
            _close("c_accumulation", stats, exp_stats, F32)
            _stats_equal_count(stats["bn1"], exp_stats["bn1"])
        exp_grads, _ = interop.from_torch_state_dict(_sub(a, "grad_step", step))
        _close("c_accumulation", acc, exp_grads, F32)
        params, buf = _torch_sgd_momentum(params, buf, acc, lr, mom)
        exp_params, exp_stats = interop.from_torch_state_dict(_sub(a, "sd_step", step))
        _close("c_accumulation", (params, stats), (exp_params, exp_stats), F32)
    final = small_net.to_torch_state_dict(params, stats)
    _close("c_accumulation", final, _sub(a, "sd_final"), F32)


# --------------------------------------------------------------------------- scenario d


def test_d_frozen_batchnorm():
    meta, a = _load("d_frozen_bn.npz")
    cfg = meta["config"]
    params, stats = small_net.from_torch_state_dict(_sub(a, "sd_init"))
    frozen = {k: params.pop(k) for k in ("bn1", "bn2")}
    x, y = small_net.nchw_to_nhwc(a["x"]), jnp.asarray(a["y"], jnp.int32)

    def loss(trainable, batch):
        # BN in eval(): running statistics, no update; BN weight/bias are constants.
        return small_net.loss_fn({**trainable, **frozen}, stats, batch, train=False)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    bs, buf = cfg["batch"], None
    for step in range(cfg["steps"]):
        batch = (x[step * bs : (step + 1) * bs], y[step * bs : (step + 1) * bs])
        (value, (new_stats, aux)), grads = value_and_grad(params, batch)
        chex.assert_trees_all_equal(new_stats, stats)
        _close(
            "d_frozen_bn",
            {"loss": value, "logits": aux["logits"]},
            {"loss": a["loss"][step], "logits": a["logits"][step]},
            F32,
        )
        exp_grads, _ = interop.from_torch_state_dict(_sub(a, "grad_step", step))
        _close("d_frozen_bn", grads, exp_grads, F32)
        params, buf = _torch_sgd_momentum(params, buf, grads, cfg["lr"], cfg["momentum"])
        exp_params, exp_stats = interop.from_torch_state_dict(_sub(a, "sd_step", step))
        _close("d_frozen_bn", ({**params, **frozen}, stats), (exp_params, exp_stats), F32)
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, stats), exp_stats)


# --------------------------------------------------------------------------- scenario e


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_e_bfloat16_inputs_float32_params(use_jit):
    meta, a = _load("e_bf16.npz")
    cfg = meta["config"]
    assert cfg["x_dtype"] == "bfloat16" and cfg["param_dtype"] == "float32"
    _run_bn_steps(
        "e_bf16",
        a,
        "",
        momentum=cfg["momentum"],
        eps=cfg["eps"],
        x_dtype=jnp.bfloat16,
        tol_y=BF16,
        use_jit=use_jit,
    )


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", MY_FIXTURES)
def test_fixture_metadata(name):
    meta, arrays = _load(name)
    assert meta["torch_version"].split("+")[0] == "2.13.0"
    assert meta["command"] == "python scripts/export_torch_fixtures.py --out tests/fixtures"
    assert meta["determinism"]["deterministic_algorithms"] is True
    assert meta["scenario"] == name[0] and meta["description"] and meta["layout"]
    assert (FIXTURES / name).stat().st_size < 1_000_000
    assert all(a.dtype != object for a in arrays.values())


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.torch
def test_fixtures_are_reproducible(tmp_path):
    """Re-running the exporter reproduces every committed array bit for bit.

    Bit-exact is the right bar: the exporter pins torch==2.13.0, one thread,
    deterministic algorithms, the scalar ATen kernels (ATEN_CPU_CAPABILITY=default),
    MKL_CBWR=COMPATIBLE and no oneDNN, so nothing depends on the CPU's vector width or
    on thread scheduling. (The .npz files themselves differ in their zip timestamps,
    so arrays and metadata are compared, not bytes.)
    """
    if importlib.util.find_spec("torch") is None:
        pytest.skip(
            "torch is not installed; the fixtures are committed and the other "
            "tests need no torch (install torch==2.13.0 to run this check)"
        )
    torch = pytest.importorskip("torch", reason="torch is not importable")
    if torch.__version__.split("+")[0] != "2.13.0":
        pytest.skip(f"the fixtures are pinned to torch==2.13.0, found {torch.__version__}")
    result = subprocess.run(
        [sys.executable, str(EXPORTER), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Only this exporter's files: tests/fixtures also holds other scripts' fixtures.
    committed = list(MY_FIXTURES)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == sorted(committed)
    for name in committed:
        with np.load(FIXTURES / name) as old, np.load(tmp_path / name) as new:
            assert sorted(old.files) == sorted(new.files), name
            for k in old.files:
                assert old[k].dtype == new[k].dtype, (name, k)
                np.testing.assert_array_equal(new[k], old[k], err_msg=f"{name}:{k}")
