"""The core contract (SPEC.md) against an independent NumPy float64 reference."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import ref_batchnorm, ref_grads, ref_moments

import bnjax

# float32 results against a float64 reference: inputs have |x| ~ 10 and unit-ish
# outputs, so a few float32 ulps of the inputs (1e-6 relative) bound the error.
RTOL, ATOL = 2e-5, 2e-5

# (x shape, feature axis): PyTorch's layouts with axis=1, their channels-last
# forms with axis=-1, and a tuple of feature axes.
LAYOUTS = [
    ((8, 3), 1),
    ((6, 3, 5), 1),
    ((4, 3, 5, 4), 1),
    ((3, 3, 2, 4, 3), 1),
    ((6, 5, 3), -1),
    ((4, 5, 4, 3), -1),
    ((3, 2, 4, 3, 3), -1),
    ((4, 5, 3, 2), (2, 3)),
    ((4, 3, 5, 2), (1, -1)),
]
MOMENTA = [0.1, 0.0, 1.0, None, 0.37]
EPSILONS = [1e-5, 1e-3]


def _features(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def _to_np(tree):
    return jax.tree.map(np.asarray, tree)


def _random_params(rng, features, affine):
    if not affine:
        return {}
    return {
        "weight": jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=features), jnp.float32),
    }


def _batch(rng, shape, step):
    # Non-zero mean, non-unit scale, changing from step to step.
    return (rng.normal(size=shape) * (1.5 + step) + 3.0 - step).astype(np.float32)


def _ref_state(batch_stats):
    return None if not batch_stats else _to_np(batch_stats)


def _run_sequence(apply_fn, *, shape, axis, momentum, eps, affine, track, seed=0):
    """>= 5 training steps then 2 eval steps, each checked against the reference."""
    rng = np.random.default_rng(seed)
    features = _features(shape, axis)
    params = _random_params(rng, features, affine)
    _, batch_stats = bnjax.init(features, affine=affine, track_running_stats=track)
    ref_state = _ref_state(batch_stats)
    axes = (axis,) if isinstance(axis, int) else axis
    w = np.asarray(params["weight"]) if affine else None
    b = np.asarray(params["bias"]) if affine else None
    for step, train in enumerate([True] * 6 + [False] * 2):
        x = _batch(rng, shape, step)
        y, batch_stats = apply_fn(params, batch_stats, x, train, momentum, eps, axis)
        y_ref, ref_state = ref_batchnorm(
            x, w, b, ref_state, train=train, momentum=momentum, eps=eps, axes=axes
        )
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=f"y, step {step}")
        if track:
            for key in ("running_mean", "running_var"):
                np.testing.assert_allclose(
                    batch_stats[key], ref_state[key], rtol=RTOL, atol=ATOL, err_msg=key
                )
                assert batch_stats[key].dtype == jnp.float32
            assert int(batch_stats["num_batches_tracked"]) == ref_state["num_batches_tracked"]
            assert batch_stats["num_batches_tracked"].dtype == jnp.int32
        else:
            assert batch_stats == {}


def _apply(params, batch_stats, x, train, momentum, eps, axis):
    return bnjax.apply(params, batch_stats, x, train, momentum=momentum, eps=eps, axis=axis)


_CONFIGS = [
    (shape, axis, MOMENTA[i % len(MOMENTA)], EPSILONS[i % 2], affine, track)
    for i, ((shape, axis), (affine, track)) in enumerate(
        itertools.product(LAYOUTS, itertools.product([True, False], repeat=2))
    )
]


class TestAgainstReference(chex.TestCase):
    """The SPEC table and update rule, every layout, with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_layouts_affine_tracking(self):
        for shape, axis, momentum, eps, affine, track in _CONFIGS:
            fn = self.variant(_apply, static_argnames=("train", "momentum", "eps", "axis"))
            _run_sequence(
                fn, shape=shape, axis=axis, momentum=momentum, eps=eps, affine=affine, track=track
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_momentum_and_eps(self):
        fn = self.variant(_apply, static_argnames=("train", "momentum", "eps", "axis"))
        for momentum, eps in itertools.product(MOMENTA, EPSILONS):
            _run_sequence(
                fn, shape=(6, 3, 4), axis=1, momentum=momentum, eps=eps, affine=True, track=True
            )


def test_train_eval_table():
    """All four train x tracked/untracked rows of the SPEC table."""
    rng = np.random.default_rng(1)
    x = _batch(rng, (8, 4), 0)
    params, stats = bnjax.init(4)
    mean, var, _ = ref_moments(x, (-1,))
    batch_norm = (x - mean) / np.sqrt(var + 1e-5)
    # train, tracked: batch statistics, stats updated.
    y, new = bnjax.apply(params, stats, x, True)
    np.testing.assert_allclose(y, batch_norm, rtol=RTOL, atol=ATOL)
    assert int(new["num_batches_tracked"]) == 1
    # train, untracked: batch statistics, {} back.
    y, new = bnjax.apply(params, {}, x, True)
    np.testing.assert_allclose(y, batch_norm, rtol=RTOL, atol=ATOL)
    assert new == {}
    # eval, tracked: running statistics, returned unchanged (bit-identical).
    stats = {
        "running_mean": jnp.asarray(rng.normal(size=4), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
        "num_batches_tracked": jnp.asarray(7, jnp.int32),
    }
    y, new = bnjax.apply(params, stats, x, False)
    expected = (x - np.asarray(stats["running_mean"], np.float64)) / np.sqrt(
        np.asarray(stats["running_var"], np.float64) + 1e-5
    )
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_equal(new, stats)
    # eval, untracked: batch statistics, {} back.
    y, new = bnjax.apply(params, {}, x, False)
    np.testing.assert_allclose(y, batch_norm, rtol=RTOL, atol=ATOL)
    assert new == {}


def test_init_layout():
    params, stats = bnjax.init(5, dtype=jnp.bfloat16)
    assert set(params) == {"weight", "bias"} and set(stats) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert params["weight"].dtype == jnp.bfloat16 and params["weight"].shape == (5,)
    np.testing.assert_array_equal(params["weight"], np.ones(5))
    np.testing.assert_array_equal(params["bias"], np.zeros(5))
    np.testing.assert_array_equal(stats["running_mean"], np.zeros(5))
    np.testing.assert_array_equal(stats["running_var"], np.ones(5))
    assert stats["running_mean"].dtype == jnp.float32
    assert stats["num_batches_tracked"].dtype == jnp.int32 and stats["num_batches_tracked"] == 0
    assert bnjax.init(5, affine=False)[0] == {}
    assert bnjax.init(5, track_running_stats=False)[1] == {}
    params, stats = bnjax.init((3, 2))
    assert params["weight"].shape == (3, 2) and stats["running_var"].shape == (3, 2)
    for bad in (0, -1, (), (3, 0), 2.5, True):
        with pytest.raises(ValueError, match="num_features"):
            bnjax.init(bad)


# --- transformations ---------------------------------------------------------


def test_jit_with_static_train_and_traced_train_error():
    params, stats = bnjax.init(3)
    x = _batch(np.random.default_rng(2), (5, 3), 0)
    f = jax.jit(bnjax.apply, static_argnames=("train",))
    y_jit, s_jit = f(params, stats, x, train=True)
    y, s = bnjax.apply(params, stats, x, True)
    chex.assert_trees_all_close((y_jit, s_jit), (y, s), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="static"):
        jax.jit(bnjax.apply)(params, stats, x, True)
    with pytest.raises(TypeError, match="bool"):
        bnjax.apply(params, stats, x, 1)


@pytest.mark.parametrize("axis,shape", [(-1, (6, 4, 3)), (1, (4, 3, 5))])
def test_grad_matches_closed_form(axis, shape):
    rng = np.random.default_rng(3)
    x = _batch(rng, shape, 1)
    c = shape[axis]
    params = _random_params(rng, (c,), True)
    g = rng.normal(size=shape).astype(np.float32)

    def loss(params, x):
        y, _ = bnjax.apply(params, bnjax.init(c)[1], x, True, axis=axis)
        return jnp.sum(y * g)

    dparams, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    dx_ref, dw_ref, db_ref = ref_grads(x, params["weight"], g, axes=(axis,))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["weight"], dw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["bias"], db_ref, rtol=1e-4, atol=1e-4)


def test_second_order_grads():
    """First and second order in x, weight and bias, numerically checked in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jnp.asarray(_batch(rng, (5, 3), 0), jnp.float64)
        w = jnp.asarray(rng.uniform(0.5, 2, 3))
        b = jnp.asarray(rng.normal(size=3))
        g = jnp.asarray(rng.normal(size=(5, 3)))

        def f(x, w, b):
            y, _ = bnjax.apply({"weight": w, "bias": b}, {}, x, True)
            return jnp.sum(jnp.sin(y) * g)

        check_grads(f, (x, w, b), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)
        check_grads(jax.jit(f), (x, w, b), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_vmap_over_ensemble_equals_members():
    rng = np.random.default_rng(5)
    members = 3
    params = {
        "weight": jnp.asarray(rng.uniform(0.5, 2, (members, 4)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(members, 4)), jnp.float32),
    }
    stats = jax.tree.map(lambda v: jnp.stack([v] * members), bnjax.init(4)[1])
    stats["running_mean"] = jnp.asarray(rng.normal(size=(members, 4)), jnp.float32)
    x = jnp.asarray(_batch(rng, (members, 6, 4), 0))
    ys, new = jax.vmap(lambda p, s, x: bnjax.apply(p, s, x, True, momentum=0.3))(params, stats, x)
    for i in range(members):
        member = jax.tree.map(lambda v, i=i: v[i], (params, stats))
        y_i, s_i = bnjax.apply(*member, x[i], True, momentum=0.3)
        chex.assert_trees_all_close(
            (ys[i], jax.tree.map(lambda v, i=i: v[i], new)), (y_i, s_i), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("shape", [(8, 3), (8, 5, 3)])
def test_vmap_over_examples_with_axis_name_equals_full_batch(shape):
    rng = np.random.default_rng(6)
    x = jnp.asarray(_batch(rng, shape, 0))
    params = _random_params(rng, (3,), True)
    stats = bnjax.init(3)[1]

    def per_example(x):
        return bnjax.apply(params, stats, x, True, axis_name="batch")

    ys, new = jax.vmap(per_example, axis_name="batch")(x)
    y_full, s_full = bnjax.apply(params, stats, x, True)
    np.testing.assert_allclose(ys, y_full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[0], new), s_full, rtol=1e-5, atol=1e-6)


def test_scan_threading_equals_python_loop():
    rng = np.random.default_rng(7)
    xs = jnp.asarray(np.stack([_batch(rng, (6, 3), t) for t in range(5)]))
    params, stats0 = bnjax.init(3)

    def body(stats, x):
        y, stats = bnjax.apply(params, stats, x, True, momentum=None)
        return stats, y

    stats_scan, ys_scan = jax.lax.scan(body, stats0, xs)
    stats = stats0
    for t in range(5):
        stats, y = body(stats, xs[t])
        np.testing.assert_allclose(ys_scan[t], y, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(stats_scan, stats, rtol=1e-6, atol=1e-6)


def test_checkpoint_matches_plain_grad():
    rng = np.random.default_rng(8)
    x = jnp.asarray(_batch(rng, (6, 3), 0))
    params = _random_params(rng, (3,), True)

    def loss(params, x):
        y, _ = bnjax.apply(params, {}, x, True)
        return jnp.sum(jnp.tanh(y))

    plain = jax.grad(loss, argnums=(0, 1))(params, x)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(plain, remat, rtol=1e-6, atol=1e-6)


# --- mask ----------------------------------------------------------------------


def test_mask_uses_only_valid_positions():
    rng = np.random.default_rng(9)
    x = _batch(rng, (4, 6, 3), 0)
    mask = np.ones((4, 6), bool)
    mask[0, 4:] = mask[2, 1:] = False
    x[~mask] = 1e3  # padding that would ruin the statistics if it counted
    params = _random_params(rng, (3,), True)
    stats = bnjax.init(3)[1]
    w, b = np.asarray(params["weight"]), np.asarray(params["bias"])
    ref_state = _to_np(stats)
    f = jax.jit(bnjax.apply, static_argnames=("train",))
    for _ in range(3):
        y, stats = f(params, stats, x, train=True, mask=mask)
        y_ref, ref_state = ref_batchnorm(x, w, b, ref_state, train=True, axes=(-1,), mask=mask)
        np.testing.assert_allclose(np.asarray(y)[mask], y_ref[mask], rtol=RTOL, atol=1e-4)
        assert np.all(np.isfinite(y))
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(stats[key], ref_state[key], rtol=RTOL, atol=ATOL)
    # The same statistics as the reference on the unpadded data alone.
    mean, var, n = ref_moments(x[mask], (-1,))
    moments = bnjax.batch_moments(jnp.asarray(x), mask=jnp.asarray(mask))
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(moments.var, var, rtol=1e-5)
    assert int(moments.count) == n == mask.sum()


def test_mask_with_padding_first_keeps_large_mean_precision():
    """The shift is the first *counted* value even when the batch starts with padding."""
    rng = np.random.default_rng(21)
    x = (1e4 + rng.normal(size=(6, 5, 3))).astype(np.float32)
    mask = np.ones((6, 5), bool)
    mask[:2] = False  # padding first: a shift taken from it would cancel every digit
    mask[2, :3] = False
    x[~mask] = 1e6
    moments = jax.jit(bnjax.batch_moments, static_argnums=1)(x, (0, 1), mask=mask)
    mean, var, n = ref_moments(x[mask], (-1,))
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-7)
    np.testing.assert_allclose(moments.var, var, rtol=1e-5)
    assert int(moments.count) == n


@pytest.mark.parametrize("valid", [0, 1])
def test_mask_with_fewer_than_two_values_keeps_running_stats(valid):
    x = _batch(np.random.default_rng(10), (3, 4, 2), 0)
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = valid == 1
    params, stats = bnjax.init(2)
    stats["running_mean"] = jnp.asarray([0.5, -0.5])
    y, new = bnjax.apply(params, stats, x, True, mask=mask)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(new["running_mean"], stats["running_mean"])
    np.testing.assert_array_equal(new["running_var"], stats["running_var"])
    assert int(new["num_batches_tracked"]) == 1


def test_empty_batch_in_training():
    params, stats = bnjax.init(3)
    y, new = bnjax.apply(params, stats, jnp.zeros((0, 3)), True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(new["running_mean"], stats["running_mean"])
    np.testing.assert_array_equal(new["running_var"], stats["running_var"])
    assert int(new["num_batches_tracked"]) == 1


# --- precision -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    rng = np.random.default_rng(11)
    x32 = _batch(rng, (16, 5, 4), 0)
    x = jnp.asarray(x32, dtype)
    params, stats = bnjax.init(4)
    f = jax.jit(bnjax.apply, static_argnames=("train",))
    y, new = f(params, stats, x, train=True)
    assert y.dtype == dtype
    assert new["running_mean"].dtype == new["running_var"].dtype == jnp.float32
    # Statistics reduced in float32 from the low-precision values: they match the
    # float64 reference of the same (rounded) inputs to float32 accuracy.
    x_rounded = np.asarray(x.astype(jnp.float32))
    _, ref_state = ref_batchnorm(x_rounded, None, None, _to_np(stats), train=True)
    np.testing.assert_allclose(new["running_mean"], ref_state["running_mean"], rtol=1e-5)
    np.testing.assert_allclose(new["running_var"], ref_state["running_var"], rtol=1e-5)
    y_ref, _ = ref_batchnorm(x_rounded, None, None, None, train=True)
    tol = float(jnp.finfo(dtype).eps) * 4
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=tol, atol=tol * 4)
    y_eval, _ = f(params, new, x, train=False)
    assert y_eval.dtype == dtype


def test_output_dtype_follows_x_not_params():
    params, stats = bnjax.init(3, dtype=jnp.bfloat16)
    y, _ = bnjax.apply(params, stats, jnp.ones((4, 3), jnp.float32).at[0].set(2.0), True)
    assert y.dtype == jnp.float32


def test_large_mean_variance_is_accurate():
    """1e4 + randn in float32: the naive E[x^2] - E[x]^2 loses every digit here."""
    rng = np.random.default_rng(12)
    x = (1e4 + rng.normal(size=(64, 8, 8, 4))).astype(np.float32)
    params, stats = bnjax.init(4)
    y, new = jax.jit(bnjax.apply, static_argnames=("train",))(params, stats, x, train=True)
    mean, var, n = ref_moments(x, (-1,))
    np.testing.assert_allclose(new["running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(new["running_mean"], 0.1 * mean, rtol=1e-6)
    y_ref, _ = ref_batchnorm(x, None, None, None, train=True)
    # x itself carries float32 rounding of 1e4 (ulp 1e-3), so y agrees to ~1e-3.
    np.testing.assert_allclose(y, y_ref, atol=2e-3)
    naive = np.mean(x**2, axis=(0, 1, 2), dtype=np.float32) - np.mean(x, (0, 1, 2)) ** 2
    assert np.max(np.abs(naive - var)) > 0.05  # the trap this test guards against is real


def test_large_mean_eval_is_accurate():
    """Eval keeps `x - running_mean` exact: folding the mean into a shift is 5e-4 off here."""
    rng = np.random.default_rng(13)
    x = (1e4 + rng.normal(size=(16, 5, 5, 4))).astype(np.float32)
    x64 = x.astype(np.float64)
    params = {
        "weight": jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    _, stats = bnjax.init(4)
    stats = dict(
        stats,
        running_mean=jnp.asarray(x64.mean(axis=(0, 1, 2)), jnp.float32),
        running_var=jnp.asarray(x64.var(axis=(0, 1, 2)), jnp.float32),
    )
    y, _ = jax.jit(bnjax.apply, static_argnames=("train",))(params, stats, x, train=False)
    # Against float64 arithmetic on the same float32 values (x and the stored statistics).
    state = {k: np.asarray(v) for k, v in stats.items()}
    y_ref, _ = ref_batchnorm(x, params["weight"], params["bias"], state, train=False)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)


# --- errors ------------------------------------------------------------------------


def _snapshot(tree):
    return jax.tree.map(np.array, tree)


@pytest.mark.parametrize(
    "case,error,word",
    [
        ("1d_x", ValueError, "shape"),
        ("axis_out_of_range", ValueError, "axis"),
        ("weight_size", ValueError, "features"),
        ("running_mean_size", ValueError, "features"),
        ("one_value_per_channel_train", ValueError, "expected more than 1 value per channel"),
        ("one_value_per_channel_eval_untracked", ValueError, "expected more than 1 value"),
        ("int_x", TypeError, "floating"),
        ("bool_x", TypeError, "floating"),
        ("params_bias_only", ValueError, "no 'weight'"),
        ("params_extra_key", ValueError, "scale"),
        ("stats_missing_key", ValueError, "num_batches_tracked"),
        ("stats_extra_key", ValueError, "mean"),
        ("eps_zero", ValueError, "eps"),
        ("eps_negative_eval", ValueError, "eps"),
        ("momentum_above_one", ValueError, "momentum"),
        ("momentum_negative_eval", ValueError, "momentum"),
        ("traced_train", TypeError, "static"),
        ("mask_shape", ValueError, "mask"),
    ],
)
def test_errors(case, error, word):
    params, stats = bnjax.init(3)
    x = jnp.ones((4, 3)).at[0].set(2.0)
    kwargs = {}
    train = True
    if case == "1d_x":
        x = jnp.ones(3)
    elif case == "axis_out_of_range":
        kwargs["axis"] = 2
    elif case == "weight_size":
        params = bnjax.init(4)[0]
    elif case == "running_mean_size":
        stats = bnjax.init(5)[1]
    elif case == "one_value_per_channel_train":
        x = jnp.ones((1, 3))
    elif case == "one_value_per_channel_eval_untracked":
        x, stats, train = jnp.ones((1, 3)), {}, False
    elif case == "int_x":
        x = jnp.ones((4, 3), jnp.int32)
    elif case == "bool_x":
        x = jnp.ones((4, 3), bool)
    elif case == "params_bias_only":  # {"weight"} alone is PyTorch's bias=False; bias alone is not
        params = {"bias": params["bias"]}
    elif case == "params_extra_key":
        params = dict(params, scale=params["weight"])
    elif case == "stats_missing_key":
        stats = {k: v for k, v in stats.items() if k != "num_batches_tracked"}
    elif case == "stats_extra_key":
        stats = dict(stats, mean=stats["running_mean"])
    elif case == "eps_zero":
        kwargs["eps"] = 0.0
    elif case == "eps_negative_eval":
        kwargs["eps"], train = -1e-5, False
    elif case == "momentum_above_one":
        kwargs["momentum"] = 1.5
    elif case == "momentum_negative_eval":
        kwargs["momentum"], train = -0.1, False
    elif case == "mask_shape":
        kwargs["mask"] = jnp.ones((4, 3), bool)
    before = _snapshot((params, stats))
    with pytest.raises(error, match=word):
        if case == "traced_train":
            jax.jit(lambda t: bnjax.apply(params, stats, x, t))(True)
        else:
            # Raised while tracing: jit sees the same error, before any computation.
            jax.jit(lambda p, s, x: bnjax.apply(p, s, x, train, **kwargs))(params, stats, x)
    chex.assert_trees_all_equal((params, stats), before)


def test_weight_size_error_names_both_sizes():
    params, stats = bnjax.init(4)
    with pytest.raises(ValueError, match=r"4 features.*3 features"):
        bnjax.apply(params, bnjax.init(3)[1], jnp.ones((2, 3)), True)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 5, 3\).*\(5,\)"):
        bnjax.apply(bnjax.init(3)[0], {}, jnp.ones((2, 5, 3)), True, axis=1)
    del stats


def test_one_value_per_channel_is_fine_with_running_stats_in_eval():
    params, stats = bnjax.init(3)
    y, new = bnjax.apply(params, stats, jnp.ones((1, 3)), False)
    assert y.shape == (1, 3) and new == stats


def test_momentum_converters_round_trip():
    assert bnjax.momentum_from_flax(0.9) == 0.1
    assert bnjax.momentum_to_flax(0.1) == 0.9
    assert bnjax.momentum_from_flax(0.99) == 0.01
    for m in (0.0, 0.1, 0.37, 1.0):
        assert bnjax.momentum_from_flax(bnjax.momentum_to_flax(m)) == m
    with pytest.raises(ValueError):
        bnjax.momentum_to_flax(1.5)
