"""The fast training path (`bnjax/_fused.py`) against the general path and closed forms.

`apply` without `mask`/`axis_name` takes the fused path (closed-form `custom_jvp`,
moments shifted by the first sample, no data-dependent branch); with an all-True mask
it takes the general path (`batch_moments` + autodiff). Both must give the same
numbers, derivatives included.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import ref_batchnorm

import bnjax
from bnjax._core import fused as _fused


def _general(params, stats, x, axis):
    """`apply` forced onto the general path by an all-True mask."""
    axes = tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    mask = jnp.ones([d for i, d in enumerate(x.shape) if i not in axes], bool)
    return bnjax.apply(params, stats, x, True, axis=axis, mask=mask)


def _params(rng, features, affine):
    if not affine:
        return {}
    return {
        "weight": jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=features), jnp.float32),
    }


CASES = [
    ((8, 5, 6, 4), -1, "float32", True),
    ((6, 3, 5), 1, "float32", False),
    ((7, 4, 3, 2), (1, 3), "float32", True),
    ((16, 8), -1, "bfloat16", True),
]


@pytest.mark.parametrize("shape, axis, dtype, affine", CASES)
@pytest.mark.parametrize("mean", [0.3, 1e3])  # a large mean cancels in raw moments
def test_fast_path_matches_general_path(shape, axis, dtype, affine, mean):
    rng = np.random.default_rng(0)
    axes = (axis,) if isinstance(axis, int) else axis
    features = tuple(shape[a] for a in axes)
    params = _params(rng, features, affine)
    _, stats = bnjax.init(features if len(features) > 1 else features[0])
    x = jnp.asarray(mean + 2 * rng.normal(size=shape), dtype)
    g = jnp.asarray(rng.normal(size=shape), dtype)

    def fast(p, x):
        return bnjax.apply(p, stats, x, True, axis=axis)

    def general(p, x):
        return _general(p, stats, x, axis)

    def with_grads(f):
        (y, new), vjp = jax.vjp(f, params, x)
        return y, new, vjp((g, jax.tree.map(jnp.zeros_like, new)))

    y1, s1, g1 = jax.jit(lambda: with_grads(fast))()
    y2, s2, g2 = jax.jit(lambda: with_grads(general))()
    tol = 1e-5 if dtype == "float32" else 2e-2
    if mean > 100:
        tol = max(tol, 1e-3)  # x itself carries float32 rounding of its large mean
    f32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(y1), f32(y2), rtol=tol, atol=tol)
    for key in s1:
        np.testing.assert_allclose(s1[key], s2[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        scale = max(1.0, float(np.abs(f32(b)).max()))
        np.testing.assert_allclose(f32(a), f32(b), rtol=10 * tol, atol=10 * tol * scale)


@pytest.mark.parametrize("mean", [0.3, 50.0])
def test_second_order_forward_and_reverse(mean):
    """jvp-of-grad and grad-of-grad of the custom_jvp, numerically checked in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(mean + rng.normal(size=(6, 3)), jnp.float64)
        w = jnp.asarray(rng.uniform(0.5, 2, 3))
        b = jnp.asarray(rng.normal(size=3))
        g = jnp.asarray(rng.normal(size=(6, 3)))

        def f(x, w, b):
            y, _ = bnjax.apply({"weight": w, "bias": b}, {}, x, True)
            return jnp.sum(jnp.sin(y) * g)

        check_grads(jax.jit(f), (x, w, b), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_transforms_compose():
    """grad under vmap, checkpoint and scan agrees with the plain per-example grad."""
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.float32)
    params, _ = bnjax.init(4)

    def loss(x):
        return jnp.sum(jnp.sin(bnjax.apply(params, {}, x, True)[0]))

    plain = jnp.stack([jax.grad(loss)(x) for x in xs])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(loss)))(xs), plain, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(jax.checkpoint(loss))))(xs), plain, atol=1e-5
    )
    scanned = jax.grad(lambda xs: jax.lax.scan(lambda c, x: (c + loss(x), None), 0.0, xs)[0])
    np.testing.assert_allclose(jax.jit(scanned)(xs), plain, atol=1e-5)


def test_parameter_only_gradient_skips_dx():
    """Differentiating only the parameters (symbolic zero dx) gives the same grads."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    params = _params(rng, (4,), True)
    both = jax.grad(lambda p, x: jnp.sum(bnjax.apply(p, {}, x, True)[0] * g))(params, x)
    only = jax.grad(lambda p: jnp.sum(bnjax.apply(p, {}, x, True)[0] * g))(params)
    for k in params:
        np.testing.assert_allclose(only[k], both[k], rtol=1e-6, atol=1e-6)


def test_eval_folded_matches_reference():
    """Eval folds scale and shift first; it still matches the float64 reference."""
    rng = np.random.default_rng(4)
    x = (0.5 + 2 * rng.normal(size=(32, 5))).astype(np.float32)
    params = _params(rng, (5,), True)
    stats = {
        "running_mean": jnp.asarray(rng.normal(size=5), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
        "num_batches_tracked": jnp.asarray(3, jnp.int32),
    }
    y, new = jax.jit(bnjax.apply, static_argnames="train")(params, stats, x, train=False)
    np_stats = {k: np.asarray(v) for k, v in stats.items()}
    np_params = [np.asarray(params[k]) for k in ("weight", "bias")]
    y_ref, _ = ref_batchnorm(x, *np_params, np_stats, train=False)
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6)
    assert new["num_batches_tracked"] == 3


def _train_step_fn(dtype):
    """One BatchNorm's training forward+backward, the unit of a model's compile."""
    params, stats = bnjax.init(4)
    x = jnp.asarray(np.random.default_rng(5).normal(3.0, 2.0, (8, 3, 3, 4)), dtype)

    def fwd_bwd(p, x):
        (y, new), vjp = jax.vjp(lambda p, x: bnjax.apply(p, stats, x, True), p, x)
        return y, new, vjp((jnp.sin(y), jax.tree.map(jnp.zeros_like, new)))

    return fwd_bwd, (params, x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_step_compiles_without_control_flow(dtype):
    """No `cond`/`switch` reaches XLA: each costs ~0.1 s of compile per BatchNorm
    (benchmarks/compile_cost.py), paid by every layer of a model at every compile."""
    fn, args = _train_step_fn(dtype)
    lowered = jax.jit(fn).lower(*args)
    text = lowered.as_text()
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
    assert " conditional(" not in lowered.compile().as_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backend_layout_changes_no_value(dtype, monkeypatch):
    """The CPU layout (optimization barriers) and the other backends' compute the same
    numbers: the trace-time choice of `_on_cpu` only moves fusion boundaries."""
    fn, args = _train_step_fn(dtype)
    outs = {}
    for on_cpu in (True, False):
        monkeypatch.setattr(_fused, "_on_cpu", lambda on_cpu=on_cpu: on_cpu)
        outs[on_cpu] = jax.jit(fn)(*args)
    tol = 1e-6 if dtype == "float32" else 1e-2
    for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False]), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )


def _eqns(jaxpr):
    """Every equation of `jaxpr`, those of its sub-jaxprs (pjit, scan, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def test_no_barrier_holds_x():
    """A bfloat16 training step reads `x` through plain conversions, no barrier.

    In a network `x` is a convolution's output that XLA:CPU computes in float32 and,
    left alone, reads back in float32 without the round trip through bfloat16. A
    barrier on `x` makes XLA write it in bfloat16 first: a conversion kernel between
    every convolution and its BatchNorm, up to 9% of a bfloat16 training step on two
    cores (docs/performance_models.md).
    """
    params, stats = bnjax.init(4)
    x = jnp.asarray(np.random.default_rng(7).normal(1.0, 2.0, (8, 3, 3, 4)), jnp.bfloat16)

    def loss(params, x):
        y, new_stats = bnjax.apply(params, stats, x, True)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))) + jnp.sum(new_stats["running_var"])

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr
    x_var = jaxpr.invars[-1]
    assert x_var.aval.shape == x.shape
    barriers = [e for e in _eqns(jaxpr) if e.primitive.name == "optimization_barrier"]
    if jax.default_backend() == "cpu":
        assert barriers, "the per-feature copies are behind barriers on CPU"
    readers = {e.primitive.name for e in jaxpr.eqns if x_var in e.invars}
    assert readers, "x is read at the top level of the jaxpr"
    assert "optimization_barrier" not in readers, readers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_x_cotangent_ends_in_a_full_size_sum(dtype):
    """The gradient of `x` ends with an addition of two full-size terms.

    XLA counts an addition with a broadcast operand as a cheap unary op and recomputes
    it, with everything that feeds it, inside each consumer: in a network, inside the
    strided transposed copy the previous convolution's weight gradient reads, which
    made a ResNet-50's training step 8% slower on CPU (docs/performance_models.md).
    """
    params, stats = bnjax.init(4)
    x = jnp.asarray(np.random.default_rng(6).normal(1.0, 2.0, (8, 3, 3, 4)), dtype)
    _, vjp = jax.vjp(lambda x: bnjax.apply(params, stats, x, True)[0], x)
    jaxpr = jax.make_jaxpr(vjp)(jnp.ones_like(x)).jaxpr
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}
    passthrough = {"convert_element_type", "reshape"}
    eqn = producers[jaxpr.outvars[0]]
    while eqn.primitive.name in passthrough:
        eqn = producers[eqn.invars[0]]
    assert eqn.primitive.name in ("add", "add_any"), eqn
    for v in eqn.invars:
        assert v.aval.shape == x.shape, eqn
        assert producers[v].primitive.name != "broadcast_in_dim", eqn
