"""Pure array maths of BatchNorm: batch moments and normalization.

No validation happens here (see `_validate.py`); these helpers take arrays and
keyword-only options and are shared by the core, the training step and the
deployment helpers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class Moments(NamedTuple):
    """Per-feature batch statistics, reduced in float32 at least."""

    mean: Array  # features' shape, float32 (float64 for float64 x)
    var: Array  # features' shape, biased (divide by n), >= 0
    count: Array | int  # number of values per feature that counted; an int when static


def stats_dtype(dtype: Any) -> Any:
    """The dtype statistics are reduced in: float32 at least, float64 kept."""
    return jnp.promote_types(dtype, jnp.float32)


def batch_moments(
    x: Array,
    reduce_axes: tuple[int, ...],
    *,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Moments:
    """Mean and biased variance of `x` over `reduce_axes` (and `axis_name`).

    Numerics: a *shifted* one-pass formulation. With a per-feature shift K taken
    from the data (the first counted value, held constant for autodiff),

        mean = K + S1 / n,   var = S2 / n - (S1 / n)^2,
        S1 = sum(x - K),     S2 = sum((x - K)^2),

    S1 and S2 come out of one sweep over `x` (one fused multi-output reduction),
    and because K is a sample of the data, |mean - K| is of the order of the
    standard deviation, so the cancellation that ruins the naive
    `E[x^2] - E[x]^2` for large-mean inputs (e.g. `1e4 + randn` in float32) does
    not happen: the relative error of `var` is O(eps_f32), not
    O(eps_f32 * mean^2 / var). Under `axis_name`, K is averaged over the named axis
    first (a tiny `pmean` of C values), then (S1, S2, n) are summed with one fused
    `psum`, so unequal shards are exact. Negative round-off is clipped to 0.

    Example:
      >>> m = batch_moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]), (0,))
      >>> m.mean.tolist(), m.var.tolist(), int(m.count)
      ([2.0, 4.0], [1.0, 4.0], 2)
    """
    dtype = stats_dtype(x.dtype)
    feature_axes = tuple(a for a in range(x.ndim) if a not in reduce_axes)
    shift = sample_shift(x, reduce_axes, mask).astype(dtype)
    if axis_name is not None:
        shift = _synced_shift(shift, mask, axis_name, axis_index_groups)
    shift = lax.stop_gradient(shift)
    shift_b = per_feature(shift, reduce_axes)
    d = x.astype(dtype) - shift_b
    if mask is not None:
        mask_b = jnp.expand_dims(mask, feature_axes)
        d = jnp.where(mask_b, d, 0)
        count = jnp.sum(mask, dtype=jnp.int32)
    else:
        count = 1
        for a in reduce_axes:
            count *= x.shape[a]
    s1 = jnp.sum(d, axis=reduce_axes)
    s2 = jnp.sum(d * d, axis=reduce_axes)
    if axis_name is not None:
        s1, s2, count = _collective(
            lax.psum, (s1, s2, jnp.asarray(count, jnp.int32)), axis_name, axis_index_groups
        )
    n = jnp.maximum(count, 1).astype(dtype) if not isinstance(count, int) else max(count, 1)
    d_mean = s1 / n
    mean = shift + d_mean
    var = jnp.maximum(s2 / n - d_mean * d_mean, 0)
    return Moments(mean=mean, var=var, count=count)


def _synced_shift(shift: Array, mask: Array | None, axis_name: Any, groups: Any) -> Array:
    """The shards' shifts averaged over `axis_name`, skipping shards with nothing counted.

    A shard whose mask is all False would otherwise contribute an arbitrary (padding,
    possibly non-finite) value to the shift.
    """
    if mask is None:
        return _collective(lax.pmean, shift, axis_name, groups)
    has = jnp.any(mask)
    total, shards = _collective(
        lax.psum, (jnp.where(has, shift, 0), has.astype(shift.dtype)), axis_name, groups
    )
    return total / jnp.maximum(shards, 1)


def _collective(op: Any, value: Any, axis_name: Any, groups: Any) -> Any:
    """`op(value, axis_name, axis_index_groups=groups)` with a clear error where groups fail."""
    try:
        return op(value, axis_name, axis_index_groups=groups)
    except NotImplementedError as e:
        if groups is None:
            raise
        raise NotImplementedError(
            f"bnjax: axis_index_groups={groups!r} over axis_name={axis_name!r} is not "
            "supported here: jax.shard_map has no axis_index_groups (jax.pmap does). Under "
            "shard_map, give the devices that sync together their own mesh axis, e.g. "
            "jax.make_mesh((2, 4), ('host', 'dev')), and pass axis_name='dev'."
        ) from e


def per_feature(v: Array, reduce_axes: tuple[int, ...]) -> Array:
    """A features'-shape array reshaped to broadcast against `x` (size 1 on `reduce_axes`)."""
    return jnp.expand_dims(v, reduce_axes)


def fold_scale(var: Array, weight: Array | None, eps: float) -> tuple[Array, Array]:
    """`rstd = rsqrt(var + eps)` and the folded per-feature scale `a = rstd * weight`."""
    rstd = lax.rsqrt(var + jnp.asarray(eps, var.dtype))
    a = rstd if weight is None else rstd * weight.astype(var.dtype)
    return rstd, a


def affine(
    x: Array, mean: Array, a: Array, bias: Array | None, reduce_axes: tuple[int, ...]
) -> Array:
    """`y = (x - mean) * a + bias`, computed in the statistics' dtype, cast to x's.

    `x - mean` is kept (not folded into the shift) because `x * a + (bias - mean * a)`
    loses the digits of large-mean inputs.
    """
    dtype = mean.dtype
    y = (x.astype(dtype) - per_feature(mean, reduce_axes)) * per_feature(a, reduce_axes)
    if bias is not None:
        y = y + per_feature(bias.astype(dtype), reduce_axes)
    return y.astype(x.dtype)


def sample_shift(x: Array, reduce_axes: tuple[int, ...], mask: Array | None) -> Array:
    """The first counted value of each feature (zeros for an empty batch), in x's dtype."""
    feature_shape = tuple(x.shape[a] for a in range(x.ndim) if a not in reduce_axes)
    if any(x.shape[a] == 0 for a in reduce_axes):
        return jnp.zeros(feature_shape, x.dtype)
    if sharded_explicitly(x, reduce_axes):
        return _shift_by_reduction(x, reduce_axes, mask)
    sizes = [1 if a in reduce_axes else d for a, d in enumerate(x.shape)]
    first = lax.slice(x, [0] * x.ndim, sizes).reshape(feature_shape)
    if mask is None or not mask.size:
        return first
    # The first position is nearly always counted (padding goes at the end). Where
    # it is not, the first counted one is found by a reduction, not by a dynamic
    # slice: on a mesh with Auto axes XLA would gather the whole batch to take a
    # data-dependent slice of a sharded axis; a static slice and a reduction
    # partition, with an all-reduce of C values.
    return lax.cond(
        mask.reshape(-1)[0].astype(bool),
        lambda x, mask: first,
        lambda x, mask: _shift_by_reduction(x, reduce_axes, mask),
        x,
        mask,
    )


def sharded_explicitly(x: Array, reduce_axes: tuple[int, ...]) -> bool:
    """Whether a reduced axis of `x` is sharded over an `Explicit` mesh axis.

    `jax.make_mesh` makes Explicit axes by default, and under them slicing one value
    out of a sharded axis is a type error, so the shift is picked by a reduction.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return bool(spec) and any(a < len(spec) and spec[a] is not None for a in reduce_axes)


def _shift_by_reduction(x: Array, reduce_axes: tuple[int, ...], mask: Array | None) -> Array:
    """`sample_shift` as a one-hot sum: partitions locally, then all-reduces C values."""
    shape = tuple(x.shape[a] for a in reduce_axes)
    flat = jnp.zeros(shape, jnp.int32)  # row-major index over the reduced axes
    stride = 1
    for i in reversed(range(len(shape))):
        flat = flat + lax.broadcasted_iota(jnp.int32, shape, i) * stride
        stride *= shape[i]
    if mask is None:
        is_first = flat == 0
    else:
        first = jnp.min(jnp.where(mask, flat, jnp.iinfo(jnp.int32).max))
        is_first = flat == first  # all False when nothing is counted: shift 0
    feature_axes = tuple(a for a in range(x.ndim) if a not in reduce_axes)
    is_first = jnp.expand_dims(is_first, feature_axes)
    return jnp.sum(jnp.where(is_first, x, jnp.zeros((), x.dtype)), axis=reduce_axes)
