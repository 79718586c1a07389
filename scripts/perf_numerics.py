"""The two error figures of docs/performance.md, measured.

1. The relative error of float32 raw moments, `var = E[x^2] - E[x]^2`, against the
   float64 variance of the same float32 values, as the ratio `mean^2 / var` grows:
   the model `c * (1 + mean^2 / var)` and its fitted `c` (the CPU fast path trusts raw
   moments while `mean^2 <= 4 var`).
2. The eval path against the float64 `(x - running_mean) * weight / sqrt(running_var +
   eps) + bias`, for `x ~ 1e4 + randn`; and what folding the mean into the shift, `x *
   scale + (bias - running_mean * scale)` (PyTorch's CPU inference kernel), would give.
3. The training forward against the float64 batch statistics, at mean 1 and 1e4:
   forward only (raw sums under the large-mean guard) and inside a training step.

    python scripts/perf_numerics.py

Deterministic (fixed seeds); CPU, a few seconds. Prints both tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

SHAPE = (64, 32, 32, 64)  # the first case of benchmarks/bench_bn.py, channels-last


@jax.jit
def raw_var(x):
    n = x.shape[0] * x.shape[1] * x.shape[2]
    s1 = jnp.sum(x, axis=(0, 1, 2))
    s2 = jnp.sum(x * x, axis=(0, 1, 2))
    mean = s1 / n
    return s2 / n - mean * mean


def raw_moment_errors() -> None:
    z = np.random.default_rng(0).standard_normal(SHAPE)
    print("mean^2/var   max rel. error of the float32 raw variance   / (1 + mean^2/var)")
    cs = []
    for ratio in (0.0, 0.25, 1.0, 4.0, 16.0, 64.0):
        x = (np.sqrt(ratio) + z).astype(np.float32)  # std 1, mean sqrt(ratio)
        ref = x.astype(np.float64).var(axis=(0, 1, 2))
        err = np.max(np.abs(np.asarray(raw_var(jnp.asarray(x)), np.float64) - ref) / ref)
        cs.append(err / (1 + ratio))
        print(f"{ratio:10.2f}   {err:.2e}   {err / (1 + ratio):.2e}")
    print(f"fitted c (median over the ratios): {np.median(cs):.1e}")


def eval_fold_error() -> None:
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal(SHAPE)).astype(np.float32)
    params, stats = bnjax.init(SHAPE[-1])
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2), ddof=1)
    stats = dict(
        stats,
        running_mean=jnp.asarray(mean, jnp.float32),
        running_var=jnp.asarray(var, jnp.float32),
    )
    y, _ = jax.jit(bnjax.apply, static_argnames="train")(params, stats, x, train=False)
    m32 = np.asarray(stats["running_mean"], np.float64)  # the stored (float32) statistics
    v32 = np.asarray(stats["running_var"], np.float64)
    ref = (x64 - m32) / np.sqrt(v32 + 1e-5)
    err = np.max(np.abs(np.asarray(y, np.float64) - ref))
    print(f"eval, x ~ 1e4 + randn {SHAPE} float32: max |y - float64 reference| = {err:.1e}")
    folded = jax.jit(_folded)(jnp.asarray(x), stats["running_mean"], stats["running_var"])
    err = np.max(np.abs(np.asarray(folded, np.float64) - ref))
    print(f"  the mean folded into the shift, x * scale + shift: {err:.1e}")


def train_forward_errors() -> None:
    """Forward-only training (the custom_jvp primal: raw sums under a guard) against
    the float64 batch statistics of the same float32 values, at a small and a large
    mean, next to the training step's forward (the JVP path: shifted sums)."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal(SHAPE)
    params, stats = bnjax.init(SHAPE[-1])
    forward = jax.jit(lambda x: bnjax.apply(params, stats, x, True)[0])
    in_step = jax.jit(lambda x: jax.vjp(lambda x: bnjax.apply(params, stats, x, True)[0], x)[0])
    for loc in (1.0, 1e4):
        x = (loc + z).astype(np.float32)
        x64 = x.astype(np.float64)
        mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
        ref = (x64 - mean) / np.sqrt(var + 1e-5)
        errs = [
            np.max(np.abs(np.asarray(f(jnp.asarray(x)), np.float64) - ref))
            for f in (forward, in_step)
        ]
        print(
            f"train forward, x ~ {loc:g} + randn: max |y - float64| = {errs[0]:.1e} "
            f"(forward only), {errs[1]:.1e} (inside a training step)"
        )


def _folded(x, mean, var):
    scale = jax.lax.rsqrt(var + 1e-5)
    return x * scale + (-mean * scale)


if __name__ == "__main__":
    raw_moment_errors()
    eval_fold_error()
    train_forward_errors()
