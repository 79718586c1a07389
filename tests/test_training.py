"""bnjax.training: accumulation under one scan, the three statistics policies, frozen BN.

Expected numbers come from the NumPy float64 reference (`reference.py`), closed
forms, or the PyTorch fixtures (scenario c: accumulation, d: frozen BN).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    HI,
    assert_leaves_close,
    assert_state_dict_close,
    fixture_arrays,
    fixture_state_dict,
)
from reference import ref_moments

import bnjax
from bnjax import training

K, B = 4, 8
_HI = HI
M1, M2 = 0.1, 0.3  # momenta of bn1 (on the data) and bn2 (downstream)
M3 = {"corrected": 0.2}  # bn3's momentum: None (cumulative) except where it cannot be


# --------------------------------------------------------------------------- a tiny model
# bn1 (momentum 0.1) and bn3 (momentum None) normalize the data itself; bn2 (0.3)
# normalizes a dense layer of their outputs. Initial statistics are not the defaults.


def _tiny_init():
    rng = np.random.default_rng(0)
    params, stats = {}, {}
    for name, c, nbt in (("bn1", 3, 3), ("bn3", 3, 5), ("bn2", 4, 2)):
        p, s = bnjax.init(c)
        params[name] = {
            "weight": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
        }
        stats[name] = {
            "running_mean": jnp.asarray(rng.normal(size=c), jnp.float32),
            "running_var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
            "num_batches_tracked": jnp.asarray(nbt, s["num_batches_tracked"].dtype),
        }
    params["dense"] = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    params["head"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    return params, stats


def _tiny_loss(params, stats, batch, m3=None, with_reports=False):
    """The tiny model; `with_reports` also returns each BatchNorm's report (third aux)."""
    x, t = batch
    new, reports = {}, {}

    def bn(name, momentum, h):
        layer = bnjax.batch_norm(momentum=momentum)
        y, moments = layer.normalize(params[name], stats[name], h, True)
        new[name], reports[name] = layer.update_stats(stats[name], moments), layer.report(moments)
        return y

    h1, h3 = bn("bn1", M1, x), bn("bn3", m3, x)
    z = jnp.dot(h1 + 0.5 * h3, params["dense"]["w"], precision=_HI) + params["dense"]["b"]
    h2 = bn("bn2", M2, z)
    pred = jnp.dot(jnp.tanh(h2), params["head"], precision=_HI)
    aux = {"pred": pred}
    return jnp.mean((pred - t) ** 2), ((new, aux, reports) if with_reports else (new, aux))


def _tiny_data(k=K, b=B, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, b, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([2.0, -4.0, 10.0])
    t = rng.normal(size=(k, b))
    return jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)


def _micro_moments(params, x):
    """float64 per-micro-batch (mean, biased var, n) of every layer's input."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = {"bn1": [], "bn3": [], "bn2": []}
    for xi in np.asarray(x, np.float64):
        mean, var, n = ref_moments(xi, (-1,))
        out["bn1"].append((mean, var, n))
        out["bn3"].append((mean, var, n))
        xhat = (xi - mean) / np.sqrt(var + 1e-5)
        h1 = xhat * p["bn1"]["weight"] + p["bn1"]["bias"]
        h3 = xhat * p["bn3"]["weight"] + p["bn3"]["bias"]
        z = (h1 + 0.5 * h3) @ p["dense"]["w"] + p["dense"]["b"]
        out["bn2"].append(ref_moments(z, (-1,)))
    return out


def _momentum(name, s0, policy="full"):
    if name == "bn3":
        return M3.get(policy, 1.0 / (int(s0[name]["num_batches_tracked"]) + 1))
    return {"bn1": M1, "bn2": M2}[name]


def _plain_step(loss_fn, optimizer):
    """The textbook one-batch step: one loss_fn call, one optax update."""

    def step(params, stats, opt_state, batch):
        (loss, (stats, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


@functools.cache
def _run_tiny(policy, k=K, reduction="mean"):
    """One jitted accumulated step of the tiny model (cached: one compile per config)."""
    params, stats = _tiny_init()
    opt = optax.sgd(0.05, momentum=0.9)
    loss_fn = functools.partial(_tiny_loss, m3=M3.get(policy), with_reports=True)
    step = training.make_train_step(
        loss_fn, opt, accum_steps=k, grad_reduction=reduction, stats_policy=policy
    )
    return jax.jit(step)(params, stats, opt.init(params), _tiny_data(k))


# --------------------------------------------------------------------------- 1. k = 1


@pytest.mark.parametrize("policy", ["micro", "corrected", "full"])
def test_k1_every_policy_is_the_plain_step(policy):
    params, stats = _tiny_init()
    opt = optax.sgd(0.05, momentum=0.9)
    x, t = _tiny_data(k=1)
    loss_fn = functools.partial(_tiny_loss, m3=M3.get(policy))
    plain = jax.jit(_plain_step(loss_fn, opt))(params, stats, opt.init(params), (x[0], t[0]))
    got = _run_tiny(policy, k=1)
    # k = 1 runs the body once, without a loop: the same numbers as the plain step.
    assert_leaves_close(got[:3], plain[:3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[3].loss, [plain[3]], rtol=1e-6)
    assert got[3].aux["pred"].shape == (1, B)


# --------------------------------------------------------------------------- gradients


def test_gradients_are_the_mean_or_sum_over_micro_batches():
    """A first SGD-momentum step moves params by -lr * (mean or sum of the k gradients)."""
    params, stats = _tiny_init()
    x, t = _tiny_data()
    grad_fn = jax.grad(lambda p, b: _tiny_loss(p, stats, b)[0])
    grads = jax.jit(jax.vmap(grad_fn, in_axes=(None, 0)))(params, (x, t))
    mean = jax.tree.map(lambda g: np.mean(np.asarray(g, np.float64), 0), grads)
    for reduction, scale in (("mean", 1.0), ("sum", K)):
        new_params = _run_tiny("micro", reduction=reduction)[0]
        moved = jax.tree.map(lambda a, b: (a - b) / 0.05, params, new_params)
        expected = jax.tree.map(lambda g, scale=scale: scale * g, mean)
        assert_leaves_close(moved, expected, rtol=1e-4, atol=1e-5)


def test_policies_change_only_the_statistics():
    micro, full, corrected = (_run_tiny(p) for p in ("micro", "full", "corrected"))
    for other in (full, corrected):
        assert_leaves_close(other[0], micro[0], rtol=1e-6, atol=1e-7)  # params
        assert_leaves_close(other[3], micro[3], rtol=1e-6, atol=1e-7)  # losses, aux


# --------------------------------------------------------------------------- 3. statistics


def test_micro_statistics_are_k_pytorch_updates():
    params, s0 = _tiny_init()
    x, _ = _tiny_data()
    moments = _micro_moments(params, x)
    got = _run_tiny("micro")[1]
    for name in ("bn1", "bn2", "bn3"):
        rm = np.asarray(s0[name]["running_mean"], np.float64)
        rv = np.asarray(s0[name]["running_var"], np.float64)
        nbt = int(s0[name]["num_batches_tracked"])
        for mean, var, n in moments[name]:
            nbt += 1
            m = 1.0 / nbt if name == "bn3" else _momentum(name, s0)
            rm, rv = (1 - m) * rm + m * mean, (1 - m) * rv + m * var * n / (n - 1)
        np.testing.assert_allclose(got[name]["running_mean"], rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name]["running_var"], rv, rtol=1e-5, atol=1e-6)
        assert int(got[name]["num_batches_tracked"]) == nbt


def test_full_statistics_are_one_big_batch_update():
    """bn1/bn3 see the data: the big-batch update on the concatenated k*B rows.

    bn2 sees per-micro-batch-normalized activations: the pooled mean and unbiased
    variance of those k*B activations (what "full" promises for deeper layers).
    """
    params, s0 = _tiny_init()
    x, _ = _tiny_data()
    got = _run_tiny("full")[1]
    moments = _micro_moments(params, x)
    for name in ("bn1", "bn3", "bn2"):
        means = np.stack([mo[0] for mo in moments[name]])
        m2 = sum(n * var for _, var, n in moments[name])
        n_total = sum(n for *_, n in moments[name])
        pooled_mean = means.mean(0)
        pooled_var = (m2 + B * ((means - pooled_mean) ** 2).sum(0)) / (n_total - 1)
        if name != "bn2":  # the same thing, straight from the concatenated data
            flat = np.asarray(x, np.float64).reshape(K * B, 3)
            np.testing.assert_allclose(pooled_mean, flat.mean(0), rtol=1e-12)
            np.testing.assert_allclose(pooled_var, flat.var(0, ddof=1), rtol=1e-12)
        m = _momentum(name, s0)
        rm = (1 - m) * np.asarray(s0[name]["running_mean"], np.float64) + m * pooled_mean
        rv = (1 - m) * np.asarray(s0[name]["running_var"], np.float64) + m * pooled_var
        # bn2's inputs carry the model's own float32 rounding (the reference is float64).
        atol = 1e-6 if name == "bn2" else 1e-7
        np.testing.assert_allclose(got[name]["running_mean"], rm, rtol=1e-6, atol=atol)
        np.testing.assert_allclose(got[name]["running_var"], rv, rtol=1e-6, atol=atol)
        assert int(got[name]["num_batches_tracked"]) == int(s0[name]["num_batches_tracked"]) + 1


def test_corrected_statistics_match_the_closed_form():
    """C_k = (1 - m) s0 + m_k sum_i (1 - m_k)^(k - i) b_i, with (1 - m_k)^k = 1 - m.

    (bn3 uses momentum 0.2 here: "corrected" refuses momentum=None, tested below.)
    """
    params, s0 = _tiny_init()
    x, t = _tiny_data()
    got = _run_tiny("corrected")[1]
    moments = _micro_moments(params, x)
    for name in ("bn1", "bn2", "bn3"):
        m = _momentum(name, s0, "corrected")
        mk = training.corrected_momentum(m, K)
        assert math.isclose((1 - mk) ** K, 1 - m, rel_tol=1e-14)
        rm = (1 - m) * np.asarray(s0[name]["running_mean"], np.float64)
        rv = (1 - m) * np.asarray(s0[name]["running_var"], np.float64)
        for i, (mean, var, n) in enumerate(moments[name], start=1):
            w = mk * (1 - mk) ** (K - i)
            rm, rv = rm + w * mean, rv + w * var * n / (n - 1)
        atol = 1e-6 if name == "bn2" else 1e-7
        np.testing.assert_allclose(got[name]["running_mean"], rm, rtol=1e-6, atol=atol)
        np.testing.assert_allclose(got[name]["running_var"], rv, rtol=1e-6, atol=atol)
        assert int(got[name]["num_batches_tracked"]) == int(s0[name]["num_batches_tracked"]) + K


def test_corrected_refuses_momentum_none_and_full_refuses_a_layer_updated_twice():
    params, stats = _tiny_init()
    opt = optax.sgd(0.1)
    batch = _tiny_data()
    args = (params, stats, opt.init(params), batch)
    reporting = functools.partial(_tiny_loss, with_reports=True)
    step = training.make_train_step(reporting, opt, accum_steps=K, stats_policy="corrected")
    with pytest.raises(ValueError, match="'bn3' uses momentum=None"):
        jax.eval_shape(step, *args)

    # A shared layer called twice per micro-batch: its two reports stack.
    nn = pytest.importorskip("flax.linen")
    import bnjax.linen

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            bn = bnjax.linen.BatchNorm()
            return bn(bn(x, train=True), train=True)

    x = batch[0]
    variables = Twice().init(jax.random.key(0), x[0])

    def twice(p, s, xb):
        y, upd = Twice().apply(
            {"params": p, "batch_stats": s}, xb, mutable=["batch_stats", bnjax.linen.REPORTS]
        )
        return jnp.mean(y), (upd["batch_stats"], None, upd[bnjax.linen.REPORTS])

    p, s = variables["params"], variables["batch_stats"]
    for policy in ("full", "corrected"):
        step = training.make_train_step(twice, opt, accum_steps=K, stats_policy=policy)
        with pytest.raises(ValueError, match="BatchNorm_0' was updated 2 times"):
            jax.eval_shape(step, p, s, opt.init(p), x)


def test_full_and_corrected_say_how_to_return_reports():
    """A loss_fn without reports: the error names the linen, nnx and functional recipes."""
    params, stats = _tiny_init()
    opt = optax.sgd(0.1)
    for policy in ("full", "corrected"):
        step = training.make_train_step(_tiny_loss, opt, accum_steps=K, stats_policy=policy)
        with pytest.raises(
            ValueError,
            match=r"(?s)returned none.*bnjax\.linen\.REPORTS.*"
            r"nnx\.capture.*bn\.report",
        ):
            jax.eval_shape(step, params, stats, opt.init(params), _tiny_data())

    def missing_bn2(p, s, b):
        loss, (new, aux, reports) = _tiny_loss(p, s, b, with_reports=True)
        return loss, (new, aux, {k: v for k, v in reports.items() if k != "bn2"})

    step = training.make_train_step(missing_bn2, opt, accum_steps=K, stats_policy="full")
    with pytest.raises(ValueError, match="'bn2' returned no report.*variable_axes"):
        jax.eval_shape(step, params, stats, opt.init(params), _tiny_data())


def test_statistics_copied_or_cast_inside_loss_fn_are_fine():
    """Reports carry the moments: no need to read the statistics straight from the input."""
    params, stats = _tiny_init()
    opt = optax.sgd(0.05, momentum=0.9)

    def copying_loss(p, s, b):
        s = jax.tree.map(lambda a: (a * 1).astype(a.dtype), s)
        return _tiny_loss(p, s, b, m3=None, with_reports=True)

    step = training.make_train_step(copying_loss, opt, accum_steps=K, stats_policy="full")
    got = jax.jit(step)(params, stats, opt.init(params), _tiny_data())
    assert_leaves_close(got[1], _run_tiny("full")[1], rtol=1e-6, atol=1e-7)


def test_bad_configuration_and_batches_raise_clear_errors():
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="accum_steps"):
        training.make_train_step(_tiny_loss, opt, accum_steps=0)
    with pytest.raises(ValueError, match="stats_policy"):
        training.make_train_step(_tiny_loss, opt, accum_steps=2, stats_policy="pooled")
    with pytest.raises(ValueError, match="grad_reduction"):
        training.make_train_step(_tiny_loss, opt, accum_steps=2, grad_reduction="avg")
    params, stats = _tiny_init()
    x, t = _tiny_data()
    step = training.make_train_step(_tiny_loss, opt, accum_steps=K)
    with pytest.raises(ValueError, match=r"leading axis of size 4.*\(32, 3\)"):
        jax.eval_shape(step, params, stats, opt.init(params), (x.reshape(K * B, 3), t))

    def bad_loss(p, s, b):
        loss, (new, aux) = _tiny_loss(p, s, b)
        return loss, ({"bn1": new["bn1"]}, aux)

    step = training.make_train_step(bad_loss, opt, accum_steps=K)
    with pytest.raises(ValueError, match="structure of batch_stats"):
        jax.eval_shape(step, params, stats, opt.init(params), (x, t))
    assert jax.tree.map(jnp.shape, stats) == jax.tree.map(jnp.shape, _tiny_init()[1])


def test_split_micro_batches():
    x, t = jnp.arange(24.0).reshape(12, 2), jnp.arange(12)
    xs, ts = training.split_micro_batches((x, t), 3)
    assert xs.shape == (3, 4, 2) and ts.shape == (3, 4)
    np.testing.assert_array_equal(ts[1], np.arange(4, 8))  # micro-batch i = rows [iB, iB+B)
    with pytest.raises(ValueError, match="divisible by accum_steps=5"):
        training.split_micro_batches((x, t), 5)


def test_corrected_momentum_closed_form():
    assert training.corrected_momentum(0.1, 1) == pytest.approx(0.1, rel=1e-15)
    assert training.corrected_momentum(0.19, 2) == pytest.approx(0.1, rel=1e-14)
    assert training.corrected_momentum(0.0, 8) == 0.0
    assert training.corrected_momentum(1.0, 8) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        training.corrected_momentum(1.5, 2)


# --------------------------------------------------------------------------- 5. structure


def _count_eqns(jaxpr, name=None):
    total = 0
    for eqn in jaxpr.eqns:
        total += name is None or eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_eqns(sub, name)
    return total


@pytest.mark.parametrize("policy", ["micro", "full"])
def test_one_scan_whatever_k(policy):
    """k does not unroll: one scan, one while loop, and a jaxpr that does not grow with k."""
    params, stats = _tiny_init()
    opt = optax.sgd(0.1)
    sizes = []
    for k in (2, 8):
        loss_fn = functools.partial(_tiny_loss, with_reports=True)
        step = training.make_train_step(loss_fn, opt, accum_steps=k, stats_policy=policy)
        args = (params, stats, opt.init(params), _tiny_data(k))
        jaxpr = jax.make_jaxpr(step)(*args).jaxpr
        assert _count_eqns(jaxpr, "scan") == 1
        hlo = jax.jit(step).lower(*args).as_text()
        assert hlo.count("stablehlo.while") == 1
        sizes.append(_count_eqns(jaxpr))
    assert sizes[0] == sizes[1]


# --------------------------------------------------------------------------- fixtures


def _small_net():
    return pytest.importorskip("small_net", reason="tests/small_net.py not present")


def test_micro_reproduces_the_pytorch_accumulation_fixture():
    """Scenario c: 4 micro-batches of 8 per SGD-momentum step, (loss / 4).backward()."""
    net = _small_net()
    fx = fixture_arrays("c_accumulation.npz")
    params, stats = net.from_torch_state_dict(fixture_state_dict(fx, "sd_init"))
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    step = jax.jit(training.make_train_step(net.loss_fn, opt, accum_steps=4))
    x = net.nchw_to_nhwc(fx["x"])
    batch = training.split_micro_batches((x, jnp.asarray(fx["y"], jnp.int32)), 3 * 4)
    losses, logits = [], []
    for s in range(3):
        micro = jax.tree.map(lambda a, s=s: a[4 * s : 4 * s + 4], batch)
        params, stats, opt_state, metrics = step(params, stats, opt_state, micro)
        losses.append(metrics.loss)
        logits.append(metrics.aux["logits"])
        assert_state_dict_close(
            net.to_torch_state_dict(params, stats),
            fixture_state_dict(fx, "sd_step", s),
            rtol=1e-4,
            atol=1e-5,
        )
    np.testing.assert_allclose(np.concatenate(losses), fx["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(logits), fx["logits"], rtol=1e-4, atol=1e-5)
    assert_state_dict_close(
        net.to_torch_state_dict(params, stats), fixture_state_dict(fx, "sd_final"), 1e-4, 1e-5
    )


@pytest.mark.parametrize("policy,k", [("micro", 1), ("full", 2)])
def test_frozen_batchnorm_matches_the_pytorch_fixture(policy, k):
    """Scenario d: BN in eval mode and frozen, the rest trained with SGD + momentum.

    With k = 2 micro-batches of 8 the step is the same (eval-mode BN makes samples
    independent), and the BN weights and statistics stay bit-identical either way.
    """
    net = _small_net()
    fx = fixture_arrays("d_frozen_bn.npz")
    params0, stats0 = net.from_torch_state_dict(fixture_state_dict(fx, "sd_init"))
    opt = training.freeze_batchnorm(optax.sgd(0.1, momentum=0.9), params0, stats0)
    eval_reports = {name: bnjax.batch_norm().report(None) for name in ("bn1", "bn2")}

    def loss_fn(params, stats, batch):  # eval-mode BatchNorms report no moments
        loss, (new_stats, aux) = net.loss_fn(params, stats, batch, train=False)
        return loss, (new_stats, aux, eval_reports)

    step = jax.jit(training.make_train_step(loss_fn, opt, accum_steps=k, stats_policy=policy))
    params, stats, opt_state = params0, stats0, opt.init(params0)
    x = net.nchw_to_nhwc(fx["x"])
    y = jnp.asarray(fx["y"], jnp.int32)
    for s in range(4):
        batch = training.split_micro_batches((x[16 * s : 16 * s + 16], y[16 * s : 16 * s + 16]), k)
        params, stats, opt_state, metrics = step(params, stats, opt_state, batch)
        np.testing.assert_allclose(jnp.mean(metrics.loss), fx["loss"][s], rtol=1e-5)
        assert_state_dict_close(
            net.to_torch_state_dict(params, stats), fixture_state_dict(fx, "sd_step", s), 1e-4, 1e-5
        )
    for name in ("bn1", "bn2"):
        for tree, tree0 in ((params, params0), (stats, stats0)):
            for key in tree0[name]:
                np.testing.assert_array_equal(tree[name][key], tree0[name][key])
                assert tree[name][key].dtype == tree0[name][key].dtype


def test_batchnorm_mask_finds_bn_params_by_their_stats_path():
    params, stats = _tiny_init()
    mask = training.batchnorm_mask(params, stats)
    assert mask["bn1"] == {"weight": True, "bias": True}
    assert mask["dense"] == {"w": False, "b": False} and mask["head"] is False
    with pytest.raises(ValueError, match="no BatchNorm statistics"):
        training.batchnorm_mask(params, {})


# --------------------------------------------------------------------------- 5. memory


def test_accumulated_step_temp_memory_is_that_of_a_micro_step():
    """Generous bounds: k=8 micro-batches of 256 need about one micro-step's temporaries.

    (benchmarks/accumulation.py measures the conv net: ~1.0x a micro-step, 0.125x
    the big batch.)
    """
    params, stats = _tiny_init()
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)

    def temp(step, batch):
        compiled = jax.jit(step).lower(params, stats, opt_state, batch).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("no memory_analysis on this backend")
        return analysis.temp_size_in_bytes

    x, t = _tiny_data(8, 256)
    accumulated = temp(training.make_train_step(_tiny_loss, opt, accum_steps=8), (x, t))
    micro = temp(_plain_step(_tiny_loss, opt), (x[0], t[0]))
    big = temp(_plain_step(_tiny_loss, opt), (x.reshape(-1, 3), t.reshape(-1)))
    assert accumulated <= 2.0 * micro, (accumulated, micro)
    assert accumulated <= 0.5 * big, (accumulated, big)


def test_full_pools_masked_micro_batches_by_their_valid_counts():
    """Unequal valid counts (one micro-batch has 1 valid row: left out) pool exactly."""
    counts = np.array([8, 3, 1, 5])
    mask = jnp.asarray(np.arange(B)[None, :] < counts[:, None])
    x, _ = _tiny_data()
    p, s0 = bnjax.init(3)

    bn = bnjax.batch_norm(momentum=0.2)

    def loss_fn(params, stats, batch):
        xb, mb = batch
        y, moments = bn.normalize(params, stats, xb, True, mask=mb)
        return jnp.mean(y**2), (bn.update_stats(stats, moments), None, bn.report(moments))

    opt = optax.sgd(0.1)
    step = training.make_train_step(loss_fn, opt, accum_steps=K, stats_policy="full")
    got = jax.jit(step)(p, s0, opt.init(p), (x, mask))[1]
    rows = np.concatenate([np.asarray(x[i, : counts[i]], np.float64) for i in (0, 1, 3)])
    np.testing.assert_allclose(got["running_mean"], 0.2 * rows.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["running_var"], 0.8 + 0.2 * rows.var(0, ddof=1), rtol=1e-6)
    assert int(got["num_batches_tracked"]) == 1


def test_flax_linen_model_with_full_policy():
    """bnjax.linen's statistics flow through Flax collections; "full" still finds them."""
    nn = pytest.importorskip("flax.linen")
    import bnjax.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = bnjax.linen.BatchNorm(momentum=0.1)(x, train=train)
            return nn.Dense(1)(x)[..., 0]

    net = Net()
    x, t = _tiny_data()
    variables = net.init(jax.random.key(0), x[0], train=False)

    def loss_fn(params, stats, batch):
        xb, tb = batch
        pred, updates = net.apply(
            {"params": params, "batch_stats": stats},
            xb,
            train=True,
            mutable=["batch_stats", bnjax.linen.REPORTS],
        )
        loss = jnp.mean((pred - tb) ** 2)
        return loss, (updates["batch_stats"], None, updates[bnjax.linen.REPORTS])

    opt = training.freeze_batchnorm(optax.sgd(0.1), variables["params"], variables["batch_stats"])
    step = training.make_train_step(loss_fn, opt, accum_steps=K, stats_policy="full")
    params, stats, _, _ = jax.jit(step)(
        variables["params"], variables["batch_stats"], opt.init(variables["params"]), (x, t)
    )
    got = stats["BatchNorm_0"]
    flat = np.asarray(x, np.float64).reshape(K * B, 3)
    np.testing.assert_allclose(got["running_mean"], 0.1 * flat.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["running_var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-6)
    assert int(got["num_batches_tracked"]) == 1
    bn0 = variables["params"]["BatchNorm_0"]
    for key in bn0:  # frozen by freeze_batchnorm, found through the Flax collections
        np.testing.assert_array_equal(params["BatchNorm_0"][key], bn0[key])
    assert not np.array_equal(params["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"])


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.torch
def test_accumulation_vs_torch_example(capsys):
    """Exits 0: with torch, the largest difference is < 1e-4; without, it says so."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "accumulation_vs_torch.py"
    spec = importlib.util.spec_from_file_location("accumulation_vs_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0
    out = capsys.readouterr().out
    assert "largest difference" in out or "PyTorch is not installed" in out


@pytest.mark.parametrize("policy", ["micro", "full"])
def test_flax_nnx_model_through_split_and_merge(policy):
    """An nnx model threads its BatchStats through the step by `nnx.split` / `nnx.merge`."""
    nnx = pytest.importorskip("flax.nnx")
    import bnjax.nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.bn = bnjax.nnx.BatchNorm(3, momentum=0.1)
            self.out = nnx.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(self.bn(x))[..., 0]

    graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    x, t = _tiny_data()

    def loss_fn(params, stats, batch):
        xb, tb = batch
        model = nnx.merge(graphdef, params, stats)
        pred, reports = nnx.capture(model, bnjax.nnx.Reports)(xb)
        loss = jnp.mean((pred - tb) ** 2)
        return loss, (nnx.state(model, nnx.BatchStat), None, reports)

    opt = optax.sgd(0.1)
    step = training.make_train_step(loss_fn, opt, accum_steps=K, stats_policy=policy)
    new_params, new_stats, _, metrics = jax.jit(step)(params, stats, opt.init(params), (x, t))

    # The first BatchNorm sees the raw inputs: its statistics follow from x alone (float64).
    xs = np.asarray(x, np.float64)
    if policy == "full":
        flat = xs.reshape(K * B, 3)
        mean, var, count = 0.1 * flat.mean(0), 0.9 + 0.1 * flat.var(0, ddof=1), 1
    else:
        mean, var = np.zeros(3), np.ones(3)
        for xb in xs:
            mean, var = 0.9 * mean + 0.1 * xb.mean(0), 0.9 * var + 0.1 * xb.var(0, ddof=1)
        count = K
    np.testing.assert_allclose(new_stats["bn"]["running_mean"][...], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_stats["bn"]["running_var"][...], var, rtol=1e-6)
    assert int(new_stats["bn"]["num_batches_tracked"][...]) == count
    assert metrics.loss.shape == (K,)
    # One optimizer update with the mean gradient moved the Linear layer.
    assert not np.array_equal(new_params["out"]["kernel"][...], params["out"]["kernel"][...])


def test_functional_model_under_jax_checkpoint():
    """`jax.checkpoint` around the functional loss_fn (reports are ordinary outputs)."""
    params, stats = _tiny_init()
    opt = optax.sgd(0.05, momentum=0.9)
    loss_fn = jax.checkpoint(functools.partial(_tiny_loss, m3=None, with_reports=True))
    step = training.make_train_step(loss_fn, opt, accum_steps=K, stats_policy="full")
    got = jax.jit(step)(params, stats, opt.init(params), _tiny_data())
    assert_leaves_close(got[:2], _run_tiny("full")[:2], rtol=1e-6, atol=1e-7)
