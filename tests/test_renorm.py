"""Batch Renormalization (`bnjax.Renorm`) against Keras, against BatchNorm, and its errors.

Expected numbers come from the Keras fixtures (`scripts/export_keras_fixtures.py`,
tf_keras 2.21 on TensorFlow's CPU build; converted in `keras_oracle.py`), from plain
BatchNorm (rmax=1, dmax=0 must be it bit for bit), or from closed forms.

Tolerances (float32): y, dx and the statistics measured up to ~2e-6 against Keras
(different summation orders and variance formulas, over 4 steps); dgamma, dbeta are
sums over up to 36 values per feature: measured up to ~6e-6. rtol = atol = 1e-5 (and
5e-5 for dgamma/dbeta) keeps a ~5x margin while a wrong convention (momentum 0.3 vs
0.7, biased vs unbiased variance, eps outside the sqrt, r not clipped) is >= 1e-2.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from keras_oracle import F32, check_against_keras, load, unclipped_corrections

import bnjax

SCENARIOS = ["renorm_clip_2d", "renorm_noclip_2d", "renorm_clip_4d", "renorm_noclip_4d"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_equals_keras_train_eval_grads_stats(name):
    check_against_keras(name)


def test_equals_keras_without_jit():
    check_against_keras("renorm_clip_4d", jit=False)


@pytest.mark.parametrize("name", [*SCENARIOS, "ghost_renorm_4d"])
def test_fixture_clipping_is_active_or_inactive_as_named(name):
    """From the fixture alone (float64): which r and d the clipping changed."""
    arrays, meta = load(name)
    clip = meta["keras_kwargs"]["renorm_clipping"]
    corrections = unclipped_corrections(arrays, meta)
    r_clipped = np.stack([(r < clip["rmin"]) | (r > clip["rmax"]) for r, _ in corrections])
    d_clipped = np.stack([np.abs(d) > clip["dmax"] for _, d in corrections])
    if "noclip" in name:
        assert not r_clipped.any() and not d_clipped.any()
    else:  # each of r and d clipped for some steps/features, and not for others
        for clipped in (r_clipped, d_clipped):
            assert clipped.any() and not clipped.all()


# ------------------------------------------------------------- rmax=1, dmax=0 is BatchNorm


def _plain_and_renorm(x, *, renorm, mask=None, axis=-1, axis_name=None, steps=3, jit=True):
    """y, grads and stats over `steps` calls, of plain BatchNorm and of `renorm`."""
    c = x.shape[axis]
    params = {"weight": jnp.linspace(0.5, 1.5, c), "bias": jnp.linspace(-1.0, 1.0, c)}

    def run(stats, renorm_opt):
        def loss(p, x, s):
            y, new = bnjax.apply(
                p, s, x, True, renorm=renorm_opt, axis=axis, axis_name=axis_name, mask=mask
            )
            return jnp.sum(jnp.sin(y)), (y, new)

        g = jax.grad(loss, argnums=(0, 1), has_aux=True)
        if axis_name is not None:
            g = jax.vmap(g, in_axes=(None, 0, None), out_axes=(0, (0, None)), axis_name=axis_name)
        g = jax.jit(g) if jit else g
        out = []
        for t in range(steps):
            grads, (y, stats) = g(params, x * (1.0 + t), stats)
            out.append((y, grads, {k: stats[k] for k in ("running_mean", "running_var")}))
        return out

    plain = run(bnjax.init(c)[1], None)
    ren = run(bnjax.init(c, renorm=True)[1], renorm)
    return plain, ren


@pytest.mark.parametrize(
    "case",
    ["2d", "4d_nchw", "mask", "axis_name", "no_jit"],
)
def test_rmax_1_dmax_0_is_batchnorm_bit_for_bit(case):
    key = jax.random.key(1)
    kw = {}
    x = jax.random.normal(key, (6, 3)) * 3 + 2
    if case == "4d_nchw":
        x, kw = jax.random.normal(key, (4, 3, 2, 2)) * 3 + 2, {"axis": 1}
    elif case == "mask":
        kw = {"mask": jnp.arange(6) < 4}
    elif case == "axis_name":
        x, kw = jax.random.normal(key, (2, 3, 3)) * 3 + 2, {"axis_name": "d"}
    elif case == "no_jit":
        kw = {"jit": False}
    plain, ren = _plain_and_renorm(x, renorm=bnjax.Renorm(rmax=1.0, dmax=0.0), steps=2, **kw)
    for a, b in zip(plain, ren, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_renorm_moves_away_from_batchnorm_when_allowed():
    x = jax.random.normal(jax.random.key(2), (8, 3)) * 3 + 2
    plain, ren = _plain_and_renorm(x, renorm=bnjax.Renorm(rmax=3.0, dmax=5.0), steps=1)
    # First step: renorm stats (0, 1) vs batch (~2, ~3): r, d clip away from 1, 0.
    assert np.abs(np.asarray(plain[0][0]) - np.asarray(ren[0][0])).max() > 0.5
    # The running statistics are PyTorch's, untouched by renorm.
    jax.tree.map(np.testing.assert_array_equal, plain[0][2], ren[0][2])


def test_closed_form_r_and_d_in_float64():
    """y = (x_hat r + d) w + b with r, d from renorm_mean / renorm_std (NumPy float64)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)) * 2 + 1
    params = {"weight": rng.uniform(0.5, 1.5, 4), "bias": rng.normal(size=4)}
    _, stats = bnjax.init(4, renorm=True)
    stats["renorm_mean"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    stats["renorm_std"] = jnp.asarray(rng.uniform(0.5, 4.0, 4), jnp.float32)
    eps, rmax, dmax = 1e-5, 1.7, 0.4
    renorm = bnjax.Renorm(rmax=rmax, dmax=dmax, momentum=0.25)
    y, new = bnjax.apply(
        {k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
        stats,
        jnp.asarray(x, jnp.float32),
        True,
        renorm=renorm,
        eps=eps,
    )
    mu, var = x.mean(0), x.var(0)
    sigma_b = np.sqrt(var + eps)
    rm, rs = np.asarray(stats["renorm_mean"], np.float64), np.asarray(stats["renorm_std"])
    r = np.clip(sigma_b / rs, 1 / rmax, rmax)
    d = np.clip((mu - rm) / rs, -dmax, dmax)
    expected = ((x - mu) / sigma_b * r + d) * params["weight"] + params["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["renorm_mean"], 0.75 * rm + 0.25 * mu, rtol=1e-6)
    np.testing.assert_allclose(new["renorm_std"], 0.75 * rs + 0.25 * sigma_b, rtol=1e-6)


def test_masked_renorm_equals_renorm_of_the_counted_rows():
    x = jax.random.normal(jax.random.key(3), (7, 3)) * 2 + 1
    mask = jnp.array([True, True, False, True, True, False, True])
    renorm = bnjax.Renorm(rmax=1.5, dmax=0.5)
    params, stats = bnjax.init(3, renorm=True)
    padded = x.at[~mask].set(jnp.nan)
    y_m, s_m = bnjax.apply(params, stats, padded, True, renorm=renorm, mask=mask)
    y_c, s_c = bnjax.apply(params, stats, x[mask], True, renorm=renorm)
    chex.assert_trees_all_close(y_m[mask], y_c, **F32)
    chex.assert_trees_all_close(s_m, s_c, **F32)


# ------------------------------------------------------------------ schedules and steps


def test_schedule_of_the_step_and_value_passed_each_step():
    """rmax/dmax as optax schedules of num_batches_tracked, or traced values, agree."""
    x = jax.random.normal(jax.random.key(4), (8, 3)) * 3 + 2
    params, stats0 = bnjax.init(3, renorm=True)
    rmax_s = optax.linear_schedule(1.0, 3.0, transition_steps=4)
    dmax_s = optax.linear_schedule(0.0, 5.0, transition_steps=4)
    scheduled = jax.jit(
        lambda s, x: bnjax.apply(params, s, x, True, renorm=bnjax.Renorm(rmax_s, dmax_s))
    )
    passed = jax.jit(lambda s, x, r, d: bnjax.apply(params, s, x, True, renorm=bnjax.Renorm(r, d)))
    plain = jax.jit(lambda s, x: bnjax.apply(params, s, x, True))
    s1, s2, s3 = stats0, stats0, bnjax.init(3)[1]
    for t in range(3):
        y1, s1 = scheduled(s1, x + t)
        y2, s2 = passed(s2, x + t, jnp.float32(1.0 + 0.5 * t), jnp.float32(1.25 * t))
        y3, s3 = plain(s3, x + t)
        np.testing.assert_array_equal(y1, y2)
        if t == 0:  # the ramps start at rmax=1, dmax=0: plain BatchNorm
            np.testing.assert_array_equal(y1, y3)
        else:
            assert np.abs(np.asarray(y1 - y3)).max() > 1e-3


@pytest.mark.slow  # over 20 s on 2 cores
def test_make_train_step_with_a_per_step_ramp_and_a_linen_model():
    import flax.linen as nn

    import bnjax.linen
    from bnjax import training

    class Net(nn.Module):
        renorm: bnjax.Renorm | None

        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(4, (3, 3))(x)
            x = bnjax.linen.BatchNorm(renorm=self.renorm)(x, train=train)
            x = nn.relu(x).mean(axis=(1, 2))
            return nn.Dense(2)(x)

    x = jax.random.normal(jax.random.key(5), (4, 8, 5, 5, 1)) + 1.0
    labels = jnp.arange(32).reshape(4, 8) % 2
    variables = Net(bnjax.Renorm()).init(jax.random.key(0), x[0], train=False)
    opt = optax.sgd(0.05)

    def make_loss(with_renorm):
        def loss_fn(params, batch_stats, batch, rmax, dmax):
            renorm = bnjax.Renorm(rmax=rmax, dmax=dmax) if with_renorm else None
            stats = batch_stats if with_renorm else _drop_renorm(batch_stats)
            logits, upd = Net(renorm).apply(
                {"params": params, "batch_stats": stats},
                batch[0],
                train=True,
                mutable=["batch_stats"],
            )
            new = upd["batch_stats"]
            new = new if with_renorm else _with_renorm(new, batch_stats)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
            return loss, (new, None)

        return jax.jit(training.make_train_step(loss_fn, opt, accum_steps=4))

    ren, plain = make_loss(True), make_loss(False)
    params, stats = variables["params"], variables["batch_stats"]
    p1, s1, _, m1 = ren(params, stats, opt.init(params), (x, labels), 1.0, 0.0)
    p2, s2, _, m2 = plain(params, stats, opt.init(params), (x, labels), 1.0, 0.0)
    jax.tree.map(np.testing.assert_array_equal, (p1, m1.loss), (p2, m2.loss))
    # The renorm statistics moved k=4 times; the same step with a wider ramp differs.
    assert not np.allclose(s1["BatchNorm_0"]["renorm_mean"], 0.0)
    p3, *_ = ren(params, stats, opt.init(params), (x, labels), 3.0, 5.0)
    assert not np.allclose(p3["Dense_0"]["kernel"], p1["Dense_0"]["kernel"])


def _drop_renorm(tree):
    bn = tree["BatchNorm_0"]
    return {"BatchNorm_0": {k: v for k, v in bn.items() if not k.startswith("renorm")}}


def _with_renorm(new, old):
    return {"BatchNorm_0": {**old["BatchNorm_0"], **new["BatchNorm_0"]}}


def test_nnx_and_factory_match_the_functional_layer():
    from flax import nnx

    import bnjax.nnx

    renorm = bnjax.Renorm(rmax=2.0, dmax=1.0, momentum=0.2)
    x = jax.random.normal(jax.random.key(6), (6, 3, 3, 2)) * 2 + 1
    layer = bnjax.batch_norm(renorm=renorm, momentum=0.3)
    params, stats = layer.init(2)
    bn = bnjax.nnx.BatchNorm(2, renorm=renorm, momentum=0.3)

    @nnx.jit
    def nnx_step(bn, x):
        return bn(x)

    for t in range(2):
        y_f, stats = layer.apply(params, stats, x * (t + 1), True)
        y_n = nnx_step(bn, x * (t + 1))  # jitted vs eager: equal to float32 rounding
        chex.assert_trees_all_close(y_f, y_n, **F32)
    for k in ("running_mean", "running_var", "renorm_mean", "renorm_std"):
        chex.assert_trees_all_close(stats[k], getattr(bn, k)[...], **F32)
    bn.eval()  # eval is plain BatchNorm with the running statistics
    nnx_stats = {k: getattr(bn, k)[...] for k in stats}
    y_eval, _ = bnjax.apply(params, nnx_stats, x, False, renorm=renorm)
    np.testing.assert_array_equal(bn(x), y_eval)
    assert layer.config.renorm == renorm


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("renorm", "match"),
    [
        (bnjax.Renorm(rmax=0.9), r"rmax.*>= 1"),
        (bnjax.Renorm(dmax=-0.1), r"dmax.*>= 0"),
        (bnjax.Renorm(rmax=2.0, rmin=3.0), "must not exceed"),
        (bnjax.Renorm(momentum=1.5), r"Renorm.momentum.*\[0, 1\]"),
    ],
)
def test_bad_settings_are_trace_time_errors(renorm, match):
    params, stats = bnjax.init(3, renorm=True)
    before = jax.tree.map(np.array, stats)
    f = jax.jit(lambda s, x: bnjax.apply(params, s, x, True, renorm=renorm))
    with pytest.raises(ValueError, match=match):
        f(stats, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=match):
        bnjax.batch_norm(renorm=renorm)
    jax.tree.map(np.testing.assert_array_equal, before, stats)


def test_missing_or_unexpected_renorm_statistics_are_clear_errors():
    x = jnp.ones((4, 3))
    params, plain = bnjax.init(3)
    _, with_renorm = bnjax.init(3, renorm=True)
    with pytest.raises(ValueError, match=r"bnjax.init\(num_features, renorm=True\)"):
        bnjax.apply(params, plain, x, True, renorm=bnjax.Renorm())
    with pytest.raises(ValueError, match="no `renorm=` was given"):
        bnjax.apply(params, with_renorm, x, False)
    with pytest.raises(ValueError, match="needs running statistics"):
        bnjax.apply(params, {}, x, True, renorm=bnjax.Renorm())
    bad = dict(with_renorm, renorm_std=jnp.ones(()))
    with pytest.raises(ValueError, match=r"batch_stats\['renorm_std'\] has shape \(\)"):
        bnjax.apply(params, bad, x, True, renorm=bnjax.Renorm())
    with pytest.raises(TypeError, match="bnjax.Renorm"):
        bnjax.apply(params, with_renorm, x, True, renorm={"rmax": 3.0})


@pytest.mark.parametrize("policy", ["corrected", "full"])
def test_policies_move_renorm_statistics_with_a_bound_passed_each_step(policy):
    """linen reports of a layer whose rmax is traced; equal micro-batches: closed form."""
    import bnjax.linen
    from bnjax import training

    x = jnp.ones((2, 4, 3)) * jnp.arange(4.0)[:, None]  # two micro-batches, mean 1.5
    variables = bnjax.linen.BatchNorm(renorm=bnjax.Renorm()).init(
        jax.random.key(0), x[0], train=False
    )
    opt = optax.sgd(0.1)

    def loss_fn(p, s, b, rmax):
        bn = bnjax.linen.BatchNorm(renorm=bnjax.Renorm(rmax=rmax, dmax=1.0, momentum=0.2))
        y, upd = bn.apply(
            {"params": p, "batch_stats": s},
            b,
            train=True,
            mutable=["batch_stats", bnjax.linen.REPORTS],
        )
        return jnp.mean(y**2), (upd["batch_stats"], None, upd[bnjax.linen.REPORTS])

    step = jax.jit(training.make_train_step(loss_fn, opt, accum_steps=2, stats_policy=policy))
    params, stats = variables["params"], variables["batch_stats"]
    _, new, _, _ = step(params, stats, opt.init(params), x, jnp.float32(2.0))
    # Either policy decays the old value by (1 - 0.2) once per step: 0.2 * 1.5.
    np.testing.assert_allclose(new["renorm_mean"], np.full(3, 0.3), rtol=1e-6)
    sigma_b = np.sqrt(np.var(np.arange(4.0)) + 1e-5)
    np.testing.assert_allclose(new["renorm_std"], np.full(3, 0.8 + 0.2 * sigma_b), rtol=1e-6)
