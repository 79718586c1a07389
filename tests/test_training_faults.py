"""Transactional training steps: `make_train_step(..., skip_nonfinite=True)`.

A step in which any micro-batch's loss or any gradient is not finite returns
`params`, `batch_stats` and `opt_state` bit-identical to its inputs and says so in
`metrics.skipped`; the next good step then equals a run that never saw the bad
batch. Checked for a functional model (every statistics policy), linen and nnx,
with k = 1 and k = 4, under `jit`, with `optax.apply_if_finite` around the
optimizer, in float64, and on 8 devices (`tests/_faults_distributed.py`, in a
subprocess). The expected values are the inputs themselves (bit for bit) and runs
that skip the bad batch by construction: no number comes from the code under test
alone.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import HI

import bnjax
from bnjax import training

K, B = 4, 8


def assert_bit_identical(actual, expected):
    """Same structure, same dtypes, same bits (NaN == NaN)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), e.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------- a functional model
# dense -> BatchNorm -> tanh -> head. `g` (one value per micro-batch) poisons the
# gradient alone: with g == 0, d/dhead of sqrt(|head_0| * g) * 0 is 0 * (0 / 0) = NaN
# while the loss stays finite. An inf in `x` poisons the loss, gradients and moments.


def _init(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    bn_p, bn_s = bnjax.init(4, dtype=dtype)
    bn_s = {k: v if k == "num_batches_tracked" else v.astype(dtype) for k, v in bn_s.items()}
    params = {
        "dense": jnp.asarray(rng.normal(size=(3, 4)), dtype),
        "bn": bn_p,
        "head": jnp.asarray(rng.normal(size=4), dtype),
    }
    return params, {"bn": bn_s}


def _loss(params, stats, batch):
    x, t, g = batch
    layer = bnjax.batch_norm(momentum=0.1)
    h = jnp.dot(x, params["dense"], precision=HI)
    y, moments = layer.normalize(params["bn"], stats["bn"], h, True)
    pred = jnp.dot(jnp.tanh(y), params["head"], precision=HI)
    poison = jnp.sqrt(jnp.abs(params["head"][0]) * g) * 0
    loss = jnp.mean((pred - t) ** 2) + poison
    return loss, (
        {"bn": layer.update_stats(stats["bn"], moments)},
        None,
        {"bn": layer.report(moments)},
    )


def _batch(seed, k=K, dtype=jnp.float32, fault=None, where=1):
    """k micro-batches of B; `fault` "loss" (an inf input) or "grad" (a NaN gradient)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, B, 3)) * [1.0, 3.0, 0.5] + [2.0, -4.0, 10.0]
    t = rng.normal(size=(k, B))
    g = np.ones(k)
    if fault == "loss":
        x[min(where, k - 1), 2, 1] = np.inf
    elif fault == "grad":
        g[min(where, k - 1)] = 0.0
    return jnp.asarray(x, dtype), jnp.asarray(t, dtype), jnp.asarray(g, dtype)


OPT = optax.sgd(0.05, momentum=0.9)  # a non-trivial opt_state (the momentum trace)


@functools.cache
def _step(policy, k, skip=True, opt=OPT):
    return jax.jit(
        training.make_train_step(
            _loss, opt, accum_steps=k, stats_policy=policy, skip_nonfinite=skip
        )
    )


def _state(step_fn, k, opt=OPT):
    """The state after one good step (opt_state and statistics not at their init)."""
    params, stats = _init()
    params, stats, opt_state, metrics = step_fn(params, stats, opt.init(params), _batch(0, k))
    assert not bool(metrics.skipped)
    return params, stats, opt_state


@pytest.mark.parametrize("fault", ["loss", "grad"])
@pytest.mark.parametrize("k", [1, K])
@pytest.mark.parametrize("policy", ["micro", "corrected", "full"])
def test_a_skipped_step_changes_nothing_and_the_next_step_never_saw_it(policy, k, fault):
    step = _step(policy, k)
    state = _state(step, k)
    bad = _batch(1, k, fault=fault, where=k - 1 if fault == "loss" else 0)
    *after_bad, metrics = step(*state, bad)
    assert bool(metrics.skipped)
    assert_bit_identical(tuple(after_bad), state)
    # The losses are still reported (the bad micro-batch's is not finite, or all are).
    assert metrics.loss.shape == (k,)
    if fault == "grad":
        assert np.all(np.isfinite(metrics.loss))

    good = _batch(2, k)
    *resumed, m1 = step(*after_bad, good)
    *never_bad, m2 = step(*state, good)
    assert not bool(m1.skipped) and not bool(m2.skipped)
    assert_bit_identical(tuple(resumed), tuple(never_bad))
    assert_bit_identical(m1.loss, m2.loss)


@pytest.mark.parametrize("policy,k", [("micro", 1), ("full", K)])
def test_the_guard_changes_no_number_of_a_good_step(policy, k):
    guarded, plain = _step(policy, k, skip=True), _step(policy, k, skip=False)
    state = _state(plain, k)
    *a, ma = guarded(*state, _batch(3, k))
    *b, mb = plain(*state, _batch(3, k))
    assert_bit_identical(tuple(a), tuple(b))
    assert not bool(ma.skipped) and not bool(mb.skipped)


def test_default_is_off_and_a_nan_is_loud():
    plain = _step("micro", K, skip=False)
    state = _state(plain, K)
    params, stats, _, metrics = plain(*state, _batch(1, K, fault="loss"))
    assert not bool(metrics.skipped)
    assert not np.all(np.isfinite(np.asarray(stats["bn"]["running_mean"])))
    assert not np.all(np.isfinite(np.asarray(params["head"])))


def test_apply_if_finite_alone_keeps_params_but_not_statistics_the_guard_keeps_both():
    """The issue's measurement, and how the two guards combine (docs/accumulation.md)."""
    opt = optax.apply_if_finite(optax.sgd(0.05, momentum=0.9), max_consecutive_errors=3)
    bad = _batch(1, 2, fault="loss", where=0)

    unguarded = _step("micro", 2, skip=False, opt=opt)
    state = _state(unguarded, 2, opt=opt)
    params, stats, opt_state, _ = unguarded(*state, bad)
    assert_bit_identical(params, state[0])  # the optimizer ignored the update...
    assert int(opt_state.notfinite_count) == 1
    assert not np.isfinite(np.asarray(stats["bn"]["running_mean"])).all()  # ...BatchNorm did not

    guarded = _step("micro", 2, skip=True, opt=opt)
    *after, metrics = guarded(*state, bad)
    assert bool(metrics.skipped)
    assert_bit_identical(tuple(after), state)
    # The optimizer never saw the bad gradient: its counters did not move.
    assert int(after[2].notfinite_count) == 0 and int(after[2].total_notfinite) == 0


def test_float64_end_to_end():
    with jax.enable_x64(True):
        params, stats = _init(jnp.float64)
        assert stats["bn"]["running_mean"].dtype == jnp.float64
        step = jax.jit(
            training.make_train_step(
                _loss, OPT, accum_steps=2, stats_policy="full", skip_nonfinite=True
            )
        )
        state = (params, stats, OPT.init(params))
        state = tuple(step(*state, _batch(0, 2, jnp.float64))[:3])
        *after, metrics = step(*state, _batch(1, 2, jnp.float64, fault="grad"))
        assert bool(metrics.skipped)
        assert_bit_identical(tuple(after), state)
        assert jax.tree.leaves(after[0])[0].dtype == jnp.float64
        assert after[1]["bn"]["running_var"].dtype == jnp.float64


def test_vmap_replicas_make_one_decision():
    """Under a named axis, one replica's bad loss skips every replica (axis_name)."""
    step = training.make_train_step(
        _loss, OPT, accum_steps=2, stats_policy="micro", skip_nonfinite=True, axis_name="r"
    )
    state = _state(_step("micro", 2), 2)
    batches = [_batch(5, 2), _batch(6, 2, fault="grad", where=1)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *batches)
    out = jax.jit(jax.vmap(step, in_axes=(None, None, None, 0), axis_name="r"))(*state, stacked)
    assert np.asarray(out[3].skipped).tolist() == [True, True]
    for r in range(2):
        assert_bit_identical(jax.tree.map(lambda a, r=r: a[r], tuple(out[:3])), state)
    # Without the shared decision, the good replica would have moved on alone.
    alone = training.make_train_step(
        _loss, OPT, accum_steps=2, stats_policy="micro", skip_nonfinite=True
    )
    out = jax.jit(jax.vmap(alone, in_axes=(None, None, None, 0)))(*state, stacked)
    assert np.asarray(out[3].skipped).tolist() == [False, True]


def test_bad_options_raise_when_the_step_is_built():
    with pytest.raises(ValueError, match="does nothing without it"):
        training.make_train_step(_loss, OPT, axis_name="data")
    with pytest.raises(ValueError, match="skip_nonfinite must be a bool"):
        training.make_train_step(_loss, OPT, skip_nonfinite="yes")


# --------------------------------------------------------------------------- linen and nnx


def _flax_batch(seed, k, fault=None):
    x, t, _ = _batch(seed, k, fault=fault, where=k - 1)
    return x, t


@pytest.mark.parametrize("k", [1, K])
def test_linen_model(k):
    nn = pytest.importorskip("flax.linen")
    import bnjax.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(4)(x)
            x = bnjax.linen.BatchNorm(momentum=0.1)(x, train=train)
            return nn.Dense(1)(jnp.tanh(x))[..., 0]

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((B, 3)), train=False)

    def loss_fn(params, stats, batch):
        x, t = batch
        pred, updates = net.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mutable=["batch_stats", bnjax.linen.REPORTS],
        )
        loss = jnp.mean((pred - t) ** 2)
        return loss, (updates["batch_stats"], None, updates[bnjax.linen.REPORTS])

    _check_model(loss_fn, variables["params"], variables["batch_stats"], k)


@pytest.mark.parametrize("k", [1, K])
def test_nnx_model(k):
    nnx = pytest.importorskip("flax.nnx")
    import bnjax.nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.bn = bnjax.nnx.BatchNorm(4, momentum=0.1)
            self.out = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.bn(self.dense(x))))[..., 0]

    graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)

    def loss_fn(params, stats, batch):
        x, t = batch
        model = nnx.merge(graphdef, params, stats)
        pred, reports = nnx.capture(model, bnjax.nnx.Reports)(x)
        return jnp.mean((pred - t) ** 2), (nnx.state(model, nnx.BatchStat), None, reports)

    _check_model(loss_fn, params, stats, k)


def _check_model(loss_fn, params, stats, k):
    step = jax.jit(
        training.make_train_step(
            loss_fn, OPT, accum_steps=k, stats_policy="full", skip_nonfinite=True
        )
    )
    params, stats, opt_state, m0 = step(params, stats, OPT.init(params), _flax_batch(0, k))
    state = (params, stats, opt_state)
    assert not bool(m0.skipped)
    *after_bad, m = step(*state, _flax_batch(1, k, fault="loss"))
    assert bool(m.skipped)
    assert_bit_identical(tuple(after_bad), state)
    *resumed, _ = step(*after_bad, _flax_batch(2, k))
    *never_bad, _ = step(*state, _flax_batch(2, k))
    assert_bit_identical(tuple(resumed), tuple(never_bad))
    count = jax.tree.leaves(
        jax.tree.map(lambda a: a, resumed[1]), is_leaf=lambda a: hasattr(a, "dtype")
    )
    assert any(np.asarray(c).dtype.kind == "i" and int(np.asarray(c)) == 2 for c in count)


# --------------------------------------------------------------------------- 8 devices

SCRIPT = Path(__file__).with_name("_faults_distributed.py")


def test_eight_devices_one_decision(tmp_path: Path) -> None:
    """shard_map, pmap and jit + NamedSharding on 8 CPU devices, in one subprocess."""
    out = tmp_path / "results.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not out.exists():
        pytest.fail(f"{SCRIPT.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    results = json.loads(out.read_text())
    assert sorted(results) == ["jit_named_sharding", "pmap", "shard_map"], results
    failed = {name: msg for name, msg in results.items() if msg != "ok"}
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-4000:]
