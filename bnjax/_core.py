"""The core of bnjax: `init`, and `apply` as the composition of two pure steps.

`normalize` computes `y` (and the batch moments when batch statistics are used);
`update_stats` folds moments into the running statistics with PyTorch's update;
`apply(...) == update_stats(batch_stats, normalize(...)[1])` with `y`, bit for bit.
Everything else in the package (Flax modules, interop, training steps, deployment
helpers) wires state to these functions; the maths lives here and in `_stats.py`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _fused, _stats
from bnjax._conventions import PARAM_KEYS, STAT_KEYS
from bnjax._validate import (
    check_hyperparameters,
    check_keys,
    check_mask,
    check_params_keys,
    check_train,
    check_x,
    feature_shape_of,
    normalize_axes,
)

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
DTypeLike = Any
Params = dict[str, Array]
BatchStats = dict[str, Array]

__all__ = ["PARAM_KEYS", "STAT_KEYS", "apply", "init", "normalize", "update_stats"]


def init(
    num_features: int | Sequence[int],
    *,
    affine: bool = True,
    bias: bool = True,
    track_running_stats: bool = True,
    dtype: DTypeLike = jnp.float32,
    **misplaced: Any,
) -> tuple[Params, BatchStats]:
    """Creates the parameters and running statistics of a BatchNorm.

    The trees use PyTorch's `state_dict` names, so a `torch.nn.BatchNorm*d`'s state
    maps onto them one to one.

    Args:
      num_features: the number of features C (an int), or the features' shape
        (a tuple of ints) when `apply` is given several feature axes.
      affine: whether to create a learnable per-feature `weight` (and `bias`).
      bias: with `affine`, whether to create `bias` too; `bias=False` gives
        `{"weight"}` alone, PyTorch's `BatchNorm2d(C, bias=False)`.
      track_running_stats: whether to create running statistics.
      dtype: the dtype of `weight` and `bias`. Running statistics are float32.
      **misplaced: nothing is accepted here; `eps` and `momentum` belong to
        `bnjax.apply` (or to `bnjax.batch_norm`, which keeps them with the layer).

    Returns:
      `(params, batch_stats)`: `params` is `{"weight": ones, "bias": zeros}` (or
      `{"weight"}` alone with `bias=False`, `{}` with `affine=False`); `batch_stats`
      is `{"running_mean": zeros, "running_var": ones, "num_batches_tracked": 0}`
      (or `{}` when `track_running_stats=False`).

    Raises:
      ValueError: if `num_features` is not a positive int or a tuple of them.
      TypeError: an unknown keyword, e.g. `eps` or `momentum` (they are `apply`'s).

    Example:
      >>> params, batch_stats = bnjax.init(3)
      >>> params["weight"].shape, batch_stats["num_batches_tracked"].dtype
      ((3,), dtype('int32'))
      >>> sorted(bnjax.init(3, bias=False)[0])
      ['weight']
    """
    if misplaced:
        names = sorted(misplaced)
        hint = ""
        if {"eps", "momentum", "epsilon", "axis", "axis_name"} & set(names):
            hint = (
                " `eps`, `momentum`, `axis` and `axis_name` are settings of the forward "
                "pass: pass them to `bnjax.apply(params, batch_stats, x, train, eps=...)`, "
                "or build the layer once with `bn = bnjax.batch_norm(eps=...)` and use "
                "`bn.init(num_features)` / `bn.apply(...)`."
            )
        raise TypeError(
            f"bnjax.init got unexpected keyword argument(s) {names}; it takes "
            f"num_features, affine, bias, track_running_stats and dtype.{hint}"
        )
    shape = _feature_shape_from_num_features(num_features)
    params: Params = {}
    if affine:
        params = {"weight": jnp.ones(shape, dtype)}
        if bias:
            params["bias"] = jnp.zeros(shape, dtype)
    batch_stats: BatchStats = {}
    if track_running_stats:
        batch_stats = {
            "running_mean": jnp.zeros(shape, jnp.float32),
            "running_var": jnp.ones(shape, jnp.float32),
            "num_batches_tracked": jnp.zeros((), jnp.int32),
        }
    return params, batch_stats


def apply(
    params: Params,
    batch_stats: BatchStats,
    x: ArrayLike,
    train: bool,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
) -> tuple[Array, BatchStats]:
    r"""Normalizes `x` per feature, PyTorch's BatchNorm as a pure function.

    $$y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \text{weight} + \text{bias}$$

    | train | batch_stats | normalize with            | returned batch_stats |
    |-------|-------------|---------------------------|----------------------|
    | True  | present     | batch mean, biased var    | updated              |
    | True  | `{}`        | batch mean, biased var    | `{}`                 |
    | False | present     | running mean and var      | unchanged            |
    | False | `{}`        | batch mean, biased var    | `{}`                 |

    The update (n = number of values per feature that count):
    `num_batches_tracked += 1`; `m = momentum`, or `1 / num_batches_tracked` when
    `momentum is None`; `running_mean = (1 - m) running_mean + m mean`;
    `running_var = (1 - m) running_var + m var n / (n - 1)` (unbiased). When fewer
    than 2 values count (a mask, or an empty batch) the running statistics are kept.
    `apply` is `normalize` followed by `update_stats`, bit for bit.

    Args:
      params: `{"weight", "bias"}` of the features' shape, `{"weight"}` alone
        (PyTorch's `bias=False`), or `{}` (no affine).
      batch_stats: `{"running_mean", "running_var", "num_batches_tracked"}`, or `{}`.
      x: a floating-point array with at least 2 dimensions (1 under a named axis).
      train: a Python bool, static under `jax.jit`: batch statistics (True) or
        running statistics (False).
      momentum: PyTorch's momentum, the weight of the new batch (Flax's momentum is
        `1 - momentum`); `None` for a cumulative average. Static.
      eps: added to the variance for stability; must be > 0. Static.
      axis: the feature axis (an int, default channels-last `-1`; PyTorch's NCHW is
        `1`), or a tuple of feature axes. Every other axis is reduced. Static.
      axis_name: a named axis (`vmap`, `pmap`, `shard_map`) over which batch
        statistics are synchronized, as PyTorch's `SyncBatchNorm` does. Static.
      axis_index_groups: sub-groups of `axis_name` to synchronize within (`pmap`).
      mask: a boolean array of `x`'s shape without the feature axes, or one that
        broadcasts to it (`(N, 1)` drops whole samples); only `True` positions count
        toward the statistics. Padding may hold anything, NaN and inf included.

    Returns:
      `(y, new_batch_stats)`: `y` has `x`'s shape and dtype; `new_batch_stats` has
      the structure and dtypes of `batch_stats`.

    Raises:
      TypeError: `train` is traced or not a bool; `x` is not floating point.
      ValueError: bad shapes, axes, keys or hyperparameters (see SPEC.md).

    Example:
      >>> params, batch_stats = bnjax.init(3)
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> y, batch_stats = bnjax.apply(params, batch_stats, x, train=True)
      >>> y.shape, int(batch_stats["num_batches_tracked"])
      ((4, 3), 1)
    """
    check_hyperparameters(momentum=momentum, eps=eps)  # momentum checked whatever train is
    y, moments = normalize(
        params,
        batch_stats,
        x,
        train,
        eps=eps,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
    )
    return y, update_stats(batch_stats, moments, momentum=momentum)


def normalize(
    params: Params,
    batch_stats: BatchStats,
    x: ArrayLike,
    train: bool,
    *,
    eps: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
) -> tuple[Array, _stats.Moments | None]:
    r"""The first step of `apply`: `y`, and the batch moments it normalized with.

    $$y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \text{weight} + \text{bias}$$

    Batch statistics are used when `train` is True or `batch_stats` is `{}` (the
    moments are returned); otherwise the running statistics are (and the moments
    are `None`). Nothing is updated: pass the moments to `update_stats` (or pool
    several batches' moments first, e.g. across micro-batches or devices).

    Args:
      params: `{"weight", "bias"}`, `{"weight"}` alone, or `{}`.
      batch_stats: `{"running_mean", "running_var", "num_batches_tracked"}`, or `{}`.
      x: a floating-point array with at least 2 dimensions (1 under a named axis).
      train: a Python bool, static under `jax.jit`.
      eps: added to the variance; must be > 0. Static.
      axis: the feature axis or axes. Static.
      axis_name: a named axis to synchronize batch statistics over. Static.
      axis_index_groups: sub-groups of `axis_name` to synchronize within (`pmap`).
      mask: boolean, `x`'s shape without the feature axes or broadcasting to it.

    Returns:
      `(y, moments)`: `y` has `x`'s shape and dtype; `moments` is a `bnjax.Moments`
      (per-feature mean, biased variance, reduced in float32 at least, and the count
      of values per feature: an int when static, else an int32 scalar) or `None`.

    Raises:
      TypeError, ValueError: as `apply`.

    Example:
      >>> params, batch_stats = bnjax.init(2)
      >>> x = jnp.array([[0.0, 1.0], [2.0, 5.0]])
      >>> y, moments = bnjax.normalize(params, batch_stats, x, train=True)
      >>> moments.mean, moments.var, moments.count
      (Array([1., 3.], dtype=float32), Array([1., 4.], dtype=float32), 2)
    """
    # --- static checks: everything below raises at trace time, before any maths.
    train = check_train(train)
    check_hyperparameters(momentum=None, eps=eps)
    check_params_keys(params)
    check_keys("batch_stats", batch_stats, STAT_KEYS)
    x = check_x(x, allow_1d=axis_name is not None)
    axes = normalize_axes(axis, x.shape)
    features = feature_shape_of(x.shape, axes)
    _check_tree_shapes(params, batch_stats, features, x.shape, axes)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    if mask is not None:
        mask = check_mask(mask, x.shape, axes)

    use_batch_stats = train or not batch_stats
    if use_batch_stats and mask is None and axis_name is None:
        n_static = int(np.prod([x.shape[a] for a in reduce_axes], dtype=np.int64))
        if n_static == 1:
            raise ValueError(
                "bnjax.apply: expected more than 1 value per channel when training, "
                f"got input of shape {tuple(x.shape)} with feature axis {axis} "
                f"(1 value per feature). Use a batch of 2 or more, or train=False with "
                "running statistics."
            )

    weight, bias = params.get("weight"), params.get("bias")
    if not use_batch_stats:
        # Eval: one multiply-add per element, scale and shift folded first.
        y = _fused.batch_norm_eval(
            x,
            batch_stats["running_mean"],
            batch_stats["running_var"],
            weight,
            bias,
            eps=eps,
            reduce_axes=reduce_axes,
        )
        return y, None
    if (
        mask is None
        and axis_name is None
        and _fused.supports(x, reduce_axes)
        and not _stats._sharded_explicitly(x, reduce_axes)
    ):
        # The fast path: fused statistics and a closed-form derivative (`_fused.py`).
        return _fused.batch_norm_train(x, weight, bias, eps=eps, reduce_axes=reduce_axes)
    if mask is not None:
        # Padding may hold NaN or inf: replace non-finite masked-out values before any
        # arithmetic touches them, so that neither the statistics nor any gradient
        # (0 * NaN in a backward pass) sees them. Finite padding is kept as it is.
        keep = jnp.expand_dims(mask, axes) | jnp.isfinite(x)
        x = jnp.where(keep, x, jnp.zeros((), x.dtype))
    moments = _stats.batch_moments(
        x, reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    _, a = _stats.fold_scale(moments.var, weight, eps)
    return _stats.affine(x, moments.mean, a, bias, reduce_axes), moments


def update_stats(
    batch_stats: BatchStats,
    moments: _stats.Moments | None,
    *,
    momentum: float | None = 0.1,
) -> BatchStats:
    """The second step of `apply`: PyTorch's running-statistics update from moments.

    `num_batches_tracked += 1`; `m = momentum` (or `1 / num_batches_tracked` when
    `momentum is None`); `running_mean = (1 - m) running_mean + m mean`;
    `running_var = (1 - m) running_var + m var n / (n - 1)`. With fewer than 2
    counted values (`moments.count < 2`) the statistics are kept (the count still
    increments), as PyTorch does.

    Args:
      batch_stats: `{"running_mean", "running_var", "num_batches_tracked"}`, or `{}`
        (returned as `{}`).
      moments: a `bnjax.Moments` (mean, biased variance, count), e.g. from
        `normalize`; `None` (what `normalize` returns in eval mode) keeps the
        statistics unchanged.
      momentum: the weight of the new batch in [0, 1], or `None` (cumulative average).

    Returns:
      The new statistics, with the structure and dtypes of `batch_stats`.

    Raises:
      ValueError: `momentum` outside [0, 1]; `batch_stats` with other keys.

    Example:
      >>> _, batch_stats = bnjax.init(1)
      >>> moments = bnjax.Moments(mean=jnp.array([2.0]), var=jnp.array([1.0]), count=5)
      >>> new = bnjax.update_stats(batch_stats, moments, momentum=0.5)
      >>> new["running_mean"], new["running_var"]   # var * 5 / 4 = 1.25
      (Array([1.], dtype=float32), Array([1.125], dtype=float32))
    """
    check_hyperparameters(momentum=momentum, eps=1.0)
    check_keys("batch_stats", batch_stats, STAT_KEYS)
    if moments is None or not batch_stats:
        return dict(batch_stats)
    count = batch_stats["num_batches_tracked"]
    new_count = count + jnp.ones((), count.dtype)
    rm, rv = batch_stats["running_mean"], batch_stats["running_var"]
    stat_dtype = jnp.promote_types(rm.dtype, jnp.float32)
    # Stacked layers (`nn.scan`/`nn.vmap` over layers): counts have the leading axes
    # only; they broadcast against the features' axes that follow.
    lead = jnp.ndim(count)
    if momentum is None:
        m = _trailing(1.0 / new_count.astype(stat_dtype), rm.ndim - lead if lead else 0)
    else:
        m = jnp.asarray(momentum, stat_dtype)
    n = moments.count
    if not isinstance(n, int) and jnp.ndim(n) > 0:
        n = _trailing(jnp.asarray(n), rm.ndim - jnp.ndim(n))
    # Unbiased variance: var * n / (n - 1). Guarded so that n < 2 never divides by 0.
    n_safe = jnp.maximum(n, 2).astype(stat_dtype)
    unbiased = moments.var.astype(stat_dtype) * (n_safe / (n_safe - 1))
    new_rm = (1 - m) * rm.astype(stat_dtype) + m * moments.mean.astype(stat_dtype)
    new_rv = (1 - m) * rv.astype(stat_dtype) + m * unbiased
    if not (isinstance(n, int) and n >= 2):
        keep = n < 2
        new_rm = jnp.where(keep, rm.astype(stat_dtype), new_rm)
        new_rv = jnp.where(keep, rv.astype(stat_dtype), new_rv)
    return {
        "running_mean": new_rm.astype(rm.dtype),
        "running_var": new_rv.astype(rv.dtype),
        "num_batches_tracked": new_count,
    }


def _trailing(v: Array, k: int) -> Array:
    """`v` with `k` trailing axes of size 1 (to broadcast over the features' axes)."""
    return jnp.reshape(v, jnp.shape(v) + (1,) * k) if k > 0 else v


def _feature_shape_from_num_features(num_features: int | Sequence[int]) -> tuple[int, ...]:
    dims = (num_features,) if isinstance(num_features, (int, np.integer)) else num_features
    try:
        shape = tuple(operator.index(d) for d in dims if not isinstance(d, bool))
        if len(shape) != len(dims):
            shape = ()
    except TypeError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(
            "bnjax.init: num_features must be a positive int or a non-empty tuple of "
            f"positive ints, got {num_features!r}."
        )
    return shape


def _check_tree_shapes(
    params: Params,
    batch_stats: BatchStats,
    features: tuple[int, ...],
    x_shape: tuple[int, ...],
    axes: tuple[int, ...],
) -> None:
    """Every per-feature array must have the features' shape of `x`."""
    for tree_name, tree, keys in (
        ("params", params, PARAM_KEYS),
        ("batch_stats", batch_stats, STAT_KEYS[:2]),
    ):
        for key in keys:
            if key not in tree:
                continue
            shape = tuple(np.shape(tree[key]))
            if shape != features:
                size = int(np.prod(shape)) if shape else 1
                raise ValueError(
                    f"bnjax.apply: {tree_name}['{key}'] has {size} features (shape {shape}) "
                    f"but x of shape {tuple(x_shape)} has {int(np.prod(features))} features "
                    f"(shape {features}) on axis {axes if len(axes) > 1 else axes[0]}."
                )
    if "num_batches_tracked" in batch_stats:
        nbt = batch_stats["num_batches_tracked"]
        if np.shape(nbt) != ():
            raise ValueError(
                "bnjax.apply: batch_stats['num_batches_tracked'] must be a scalar, "
                f"got shape {np.shape(nbt)}."
            )
