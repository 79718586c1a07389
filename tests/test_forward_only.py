"""Forward-only training (precise BN, train-mode inference): the custom_jvp primal.

On XLA:CPU the primal takes flax.linen's plain sums `sum(x)`, `sum(x^2)` and falls
back to the shifted sums under a `lax.cond` where raw moments would lose digits
(`mean^2 > 4 var`); a training step goes through the JVP rule and stays branch-free.
Expected numbers: the float64 moments of the same float32 values (NumPy).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def _x(loc, shape=(16, 6, 6, 5), seed=0):
    z = np.random.default_rng(seed).standard_normal(shape)
    z = (z - z.mean(axis=(0, 1, 2))) / z.std(axis=(0, 1, 2))  # std 1 exactly per feature
    return (loc + z).astype(np.float32)


def _reference(x):
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    return (x64 - mean) / np.sqrt(var + 1e-5), mean, var


# mean^2 / var = 0.09, 3.6 (raw sums kept), 4.4 and 1e8 (the shifted fallback)
@pytest.mark.parametrize("loc", [0.3, 1.9, 2.1, 1e4])
def test_forward_only_moments_and_output_match_float64(loc):
    x = _x(loc)
    params, stats = bnjax.init(5)
    y, moments = jax.jit(lambda x: bnjax.normalize(params, stats, x, True))(jnp.asarray(x))
    ref, mean, var = _reference(x)
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-6, atol=1e-6)
    # Raw float32 moments err by ~ c (1 + mean^2 / var), c ~ 2e-7 at large n
    # (scripts/perf_numerics.py), a few times more at this n = 576: at most ~1e-5 where
    # they are kept (ratio <= 4); the shifted fallback is as good as at mean 0.
    np.testing.assert_allclose(moments.var, var, rtol=2e-5 if 1 < loc < 2 else 2e-6)
    # x itself carries float32 rounding of a large mean (ulp 1e-3 at 1e4).
    np.testing.assert_allclose(y, ref, atol={0.3: 2e-6, 1.9: 3e-5, 2.1: 2e-6}.get(loc, 2e-3))


@pytest.mark.parametrize("loc", [0.3, 2.1, 1e4])
def test_forward_only_equals_the_training_steps_forward(loc):
    x = jnp.asarray(_x(loc, seed=1))
    params, stats = bnjax.init(5)

    def f(x):
        return bnjax.apply(params, stats, x, True)

    y0, s0 = jax.jit(f)(x)
    (y1, s1), _ = jax.jit(lambda x: jax.vjp(f, x))(x)
    np.testing.assert_allclose(y0, y1, atol=2e-3 if loc > 100 else 1e-5)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(s0[k], s1[k], rtol=2e-6, atol=2e-6)


def _conds(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "cond"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _conds(sub)
    return n


def test_only_the_forward_has_the_guard_a_training_step_stays_branch_free():
    x = jnp.asarray(_x(0.3))
    params, stats = bnjax.init(5)

    def loss(p, x):
        return jnp.sum(bnjax.apply(p, stats, x, True)[0] ** 2)

    forward = jax.make_jaxpr(lambda x: bnjax.apply(params, stats, x, True))(x)
    step = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x)
    on_cpu = jax.default_backend() == "cpu"
    assert _conds(forward.jaxpr) == (1 if on_cpu else 0)
    assert _conds(step.jaxpr) == 0


def test_vmapped_forward_only_takes_each_instances_own_branch():
    """Under vmap the guard becomes a select: each instance still gets its moments."""
    xs = jnp.stack([jnp.asarray(_x(0.3, seed=2)), jnp.asarray(_x(1e4, seed=3))])
    params, stats = bnjax.init(5)
    ys, news = jax.jit(jax.vmap(lambda x: bnjax.apply(params, stats, x, True)))(xs)
    for i in range(2):
        ref, mean, var = _reference(np.asarray(xs[i]))
        np.testing.assert_allclose(ys[i], ref, atol=2e-3 if i else 1e-5)
        np.testing.assert_allclose(news["running_mean"][i], 0.1 * mean, rtol=1e-6, atol=1e-6)
