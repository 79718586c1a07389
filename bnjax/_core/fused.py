"""Training-mode BatchNorm with a closed-form derivative: the fast path of `apply`.

`batch_norm_train` computes the same numbers as `_stats.batch_moments` followed by
`_stats.fold_scale` and `_stats.affine`, but it is laid out for the compiler:

* Statistics in as few sweeps over `x` as the backend allows (see `_moments`).
* `y = (x - mean) * (rsqrt(var + eps) * weight) + bias`: the per-feature scale is
  folded first, so producing `y` is one elementwise pass; `x - mean` is kept (not
  folded into the shift) because `x * a + (bias - mean * a)` loses the digits of
  large-mean inputs.
* A `jax.custom_jvp` with the closed-form tangent of BatchNorm,

      dy = a dx + (x - mean) * (rstd dw - a rstd^2 E[(x - mean) dx]) + (db - a E[dx]),

  with `a = weight * rstd`. It is linear in the tangents, so reverse mode is JAX's
  transpose of it: two reductions (`sum(g)`, `sum((x - mean) g)`) and one
  elementwise pass for `dx`, instead of autodiff's tape through the moments.
  Because it is a JVP (not a VJP) rule written in differentiable `jnp` ops,
  forward mode, reverse mode and every higher order work, under `jit`, `vmap`,
  `checkpoint` and `scan`.

* A low-precision `x` is upcast by one plain conversion that every reader shares. In
  a network `x` is the output of a convolution or matmul that XLA:CPU computes in
  float32, and XLA drops the round trip through bfloat16 (its default
  `xla_allow_excess_precision`), so each reader takes that float32 result as it is,
  as in flax.linen. In reverse mode each term of `dx` is cast on its own
  (`_sum_low_precision`).

Only the static, unmasked, unsynchronized case comes here (`apply` keeps autodiff
through `batch_moments` for `mask` and `axis_name`). `batch_norm_eval` is the eval
pass, `(x - mean) * a + bias` as in training. Measurements
and the reasons for each choice: docs/performance.md.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from bnjax._core.stats import Moments, affine, fold_scale, per_feature, sample_shift, stats_dtype

Array = jax.Array


def batch_norm_train(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    *,
    eps: float,
    reduce_axes: tuple[int, ...],
) -> tuple[Array, Moments]:
    """BatchNorm with batch statistics: `y` and the batch `Moments`.

    Args:
      x: a floating-point array with at least one value per feature to reduce.
      weight: per-feature scale of the features' shape, or None.
      bias: per-feature shift of the features' shape, or None.
      eps: added to the variance, > 0.
      reduce_axes: the axes reduced over (every axis but the feature axes).

    Returns:
      `(y, moments)`: `y` with `x`'s shape and dtype; the biased batch `Moments`
      (float32 at least) with the static count `n`.

    Example:
      >>> y, m = batch_norm_train(jnp.arange(6.0).reshape(3, 2), None, None,
      ...                         eps=1e-5, reduce_axes=(0,))
      >>> m.mean
      Array([2., 3.], dtype=float32)
    """
    n = math.prod(x.shape[a] for a in reduce_axes)
    y, mean, var = _bn_train(x, weight, bias, float(eps), tuple(reduce_axes))
    return y, Moments(mean=mean, var=var, count=n)


# ------------------------------------------------------------------------- helpers


def _copies(v: Array, k: int) -> tuple[Array, ...]:
    """`k` copies of a small per-feature array that the compiler will not merge.

    XLA:CPU materializes a full-size broadcast of a vector that feeds several
    reductions or loops; giving each consumer its own copy keeps the broadcast
    inside each fused kernel. Costs nothing: the copies are C values. Other
    backends get `v` itself: a barrier there would split XLA:GPU's multi-output
    fusion of sibling reductions.

    Only per-feature arrays. Barriers on a full-size low-precision `x`, so that each
    reader converted it itself, were faster per op on a bfloat16 `x` in memory, but
    made XLA write each convolution's float32 output in bfloat16 first: a conversion
    kernel between every convolution and its BatchNorm, which cost whole bfloat16
    training steps up to 9% on two cores (docs/performance_models.md).
    """
    if _on_cpu():
        return lax.optimization_barrier((v,) * k)
    return (v,) * k


def _on_cpu() -> bool:
    """Whether the program being traced is for XLA:CPU (JAX's default backend).

    Decided at trace time, not with `lax.platform_dependent`: each of those is a
    `cond` whose branches are traced, partially evaluated and transposed under
    autodiff, about 0.08 s of trace and lowering per BatchNorm in a training step
    (benchmarks/compile_cost.py). The choice only places optimization barriers,
    which change how XLA fuses, never a value: a program traced here and run on
    another backend computes the same numbers.
    """
    return jax.default_backend() == "cpu"


def _sum(v: Array, reduce_axes: tuple[int, ...]) -> Array:
    return jnp.sum(v, axis=reduce_axes)


def _shifted_moments(
    x: Array, shift: Array, reduce_axes: tuple[int, ...], n: int
) -> tuple[Array, Array]:
    """mean, var from S1 = sum(x - K), S2 = sum((x - K)^2); K close to the mean."""
    dtype = stats_dtype(x.dtype)
    k1, k2 = _copies(shift, 2)
    xf = x.astype(dtype)
    s1 = _sum(xf - per_feature(k1, reduce_axes), reduce_axes)
    d2 = xf - per_feature(k2, reduce_axes)
    s2 = _sum(d2 * d2, reduce_axes)
    m = s1 / n
    return shift + m, jnp.maximum(s2 / n - m * m, 0)


def _moments(x: Array, reduce_axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Biased mean and variance over `reduce_axes`, float32 at least, with no branch.

    Shifted by the first value of each feature (`_stats.sample_shift`, a slice of C
    values, held constant for autodiff), so large-mean inputs keep float32 precision
    with no data-dependent branch. XLA:GPU fuses both reductions into one sweep over
    `x`; on XLA:CPU each reduction is its own kernel (docs/performance_models.md
    says why this costs less, per training step plus its compile, than raw moments
    checked by a `lax.cond`).
    """
    n = math.prod(x.shape[a] for a in reduce_axes)
    shift = sample_shift(x, reduce_axes, None).astype(stats_dtype(x.dtype))
    return _shifted_moments(x, lax.stop_gradient(shift), reduce_axes, n)


def batch_norm_eval(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None,
    bias: Array | None,
    *,
    eps: float,
    reduce_axes: tuple[int, ...],
) -> Array:
    """BatchNorm with given statistics: `y = (x - mean) * a + bias`, `a = weight * rstd`.

    The form of the training path and of flax.linen. `x - mean` keeps the digits of
    large-mean inputs: for `x ~ 1e4 + randn` in float32, 5e-7 from the float64 result
    where folding the mean into a shift (`x * a + (bias - mean * a)`, PyTorch's CPU
    inference kernel) is 5e-4 off (scripts/perf_numerics.py). Nor would the folding
    save time: XLA:CPU fuses the per-feature arithmetic into the pass over `x`, where
    the folded form is three operations more per element than this one (op for op
    flax.linen's program) and cost a ResNet-50's eval pass 1 to 2 percent.

    Args:
      x: a floating-point array.
      mean: the features' means (e.g. running_mean).
      var: the features' variances (e.g. running_var).
      weight: per-feature scale, or None.
      bias: per-feature shift, or None.
      eps: added to the variance, > 0.
      reduce_axes: every axis of `x` but the feature axes.

    Returns:
      `y` with `x`'s shape and dtype, computed in float32 at least.

    Example:
      >>> batch_norm_eval(jnp.ones((2, 3)), jnp.zeros(3), jnp.ones(3), None, None,
      ...                 eps=0.0, reduce_axes=(0,)).shape
      (2, 3)
    """
    dtype = stats_dtype(jnp.result_type(x.dtype, mean.dtype, var.dtype))
    _, a = fold_scale(var.astype(dtype), weight, eps)
    return affine(x, mean.astype(dtype), a, bias, reduce_axes)


# ------------------------------------------------------------ the custom derivative


def _forward_moments(x: Array, reduce_axes: tuple[int, ...]) -> tuple[Array, Array]:
    """The moments of the primal alone: forward-only training (precise BN, inference).

    A training step never runs this (reverse mode goes through `_bn_train_jvp`, which
    stays branch-free). On XLA:CPU, the shifted sums of `_moments` cost each reduction
    an elementwise operation inside YNNPACK's kernel (1.3-1.5x flax.linen's forward for
    a BatchNorm reading `x` from memory), so the primal takes the plain sums `sum(x)`,
    `sum(x^2)` (flax.linen's kernels) and keeps them where they are accurate,
    `mean^2 <= 4 var` for every feature (float32 raw-moment error ~ 1e-7 (1 + mean^2 /
    var), scripts/perf_numerics.py); otherwise a `lax.cond` recomputes them shifted,
    so large-mean inputs keep their digits. The conditional costs compile time once
    per BatchNorm in forward-only programs, never in a training step. Other backends
    fuse the shifted sums into one sweep and take `_moments` (a conditional there
    would read its flag on the host).
    """
    if not _on_cpu():
        return _moments(x, reduce_axes)
    n = math.prod(x.shape[a] for a in reduce_axes)
    xf = x.astype(stats_dtype(x.dtype))
    mean = _sum(xf, reduce_axes) / n
    var = _sum(xf * xf, reduce_axes) / n - mean * mean
    accurate = jnp.all(mean * mean <= 4 * var)
    return lax.cond(accurate, lambda: (mean, jnp.maximum(var, 0)), lambda: _moments(x, reduce_axes))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _bn_train(
    x: Array, weight: Array | None, bias: Array | None, eps: float, reduce_axes: tuple[int, ...]
) -> tuple[Array, Array, Array]:
    mean, var = _forward_moments(x, reduce_axes)
    _, a = fold_scale(var, weight, eps)
    return affine(x, mean, a, bias, reduce_axes), mean, var


def _bn_train_jvp(
    eps: float, reduce_axes: tuple[int, ...], primals: tuple, tangents: tuple
) -> tuple[tuple, tuple]:
    x, weight, bias = primals
    dx, dw, db = tangents
    n = math.prod(x.shape[a] for a in reduce_axes)
    mean, var = _moments(x, reduce_axes)
    dtype = mean.dtype
    rstd, a = fold_scale(var, weight, eps)
    mean_y, mean_r, mean_t = _copies(mean, 3)
    y = affine(x, mean_y, a, bias, reduce_axes)
    xf = x.astype(dtype)

    # Per-feature coefficients of dy = a dx + (x - mean) t + u.
    t = jnp.zeros_like(rstd)
    u = jnp.zeros_like(rstd)
    if weight is not None and not isinstance(dw, SymbolicZero):
        t = t + rstd * dw.astype(dtype)
    if bias is not None and not isinstance(db, SymbolicZero):
        u = u + db.astype(dtype)
    if isinstance(dx, SymbolicZero):
        dmean = jnp.zeros_like(mean)
        dvar = jnp.zeros_like(var)
        dy = (xf - per_feature(mean_t, reduce_axes)) * per_feature(t, reduce_axes)
        dy = dy + per_feature(u, reduce_axes)
    else:
        dxf = dx.astype(dtype)
        # `cov` before `dmean`, on purpose. Reverse mode adds up the cotangent of `x`
        # in the opposite order, so its last addition is of two full-size terms and
        # XLA:CPU computes it once. With the per-feature broadcast of `dmean` added
        # last, XLA counts the sum as a cheap unary op and recomputes all of it inside
        # each consumer: in a network, inside the strided transposed copy that the
        # previous convolution's weight gradient reads (docs/performance_models.md).
        cov = _sum((xf - per_feature(mean_r, reduce_axes)) * dxf, reduce_axes) / n
        dmean = _sum(dxf, reduce_axes) / n  # E[dx]
        dvar = 2 * cov  # d var = 2 E[(x - mean) dx]
        t = t - a * rstd * rstd * cov
        u = u - a * dmean
        terms = (
            dxf * per_feature(a, reduce_axes),
            (xf - per_feature(mean_t, reduce_axes)) * per_feature(t, reduce_axes),
            per_feature(u, reduce_axes),
        )
        if x.dtype != dtype:
            return (y, mean, var), (_sum_low_precision(terms, x.dtype), dmean, dvar)
        dy = terms[0] + terms[1] + terms[2]
    return (y, mean, var), (dy.astype(x.dtype), dmean, dvar)


def _sum_low_precision(terms: tuple[Array, ...], dtype: Any) -> Array:
    """`sum(terms)` cast to a low-precision `dtype`, laid out for reverse mode on CPU.

    The transpose of one cast is one upcast of the cotangent `g` that feeds two
    reductions and the `dx` pass; XLA:CPU writes such a shared upcast to memory in
    float32. Casting each term on its own, behind a barrier, transposes to one upcast
    per consumer, each fused into its kernel. Unlike a barrier on `x`, this one costs a
    network nothing: the `g` that reaches BatchNorm comes out of the activation's
    backward, a kernel that writes it in low precision anyway. Reverse mode is
    unchanged in value; a forward-mode tangent is rounded per term (a few
    low-precision ulps).
    """
    full = jnp.broadcast_shapes(*(t.shape for t in terms))

    if not _on_cpu():
        return functools.reduce(operator.add, terms).astype(dtype)
    parts = lax.optimization_barrier(tuple(jnp.broadcast_to(t, full).astype(dtype) for t in terms))
    return functools.reduce(operator.add, parts)


_bn_train.defjvp(_bn_train_jvp, symbolic_zeros=True)


def supports(x: Any, reduce_axes: tuple[int, ...]) -> bool:
    """Whether `batch_norm_train` handles `x` (a non-empty, statically sized batch)."""
    return all(x.shape[a] > 0 for a in reduce_axes) and x.size > 0
