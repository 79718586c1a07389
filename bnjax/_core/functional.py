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

from bnjax._core import deprecation
from bnjax._core import fused as _fused
from bnjax._core import ghost as _ghost
from bnjax._core import renorm as _renorm
from bnjax._core import stats as _stats
from bnjax._core.conventions import PARAM_KEYS, STAT_KEYS
from bnjax._core.validate import (
    check_hyperparameters,
    check_keys,
    check_mask,
    check_params_keys,
    check_train,
    check_x,
    feature_mismatch_hint,
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
    renorm: bool = False,
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
      dtype: the dtype of `weight` and `bias`. Running statistics are float32, or
        `dtype` where it is wider (float64: a float64 model is float64 end to end).
      renorm: with `track_running_stats`, also create Batch Renormalization's own
        statistics `renorm_mean` (zeros) and `renorm_std` (ones), float32, which
        `apply(..., renorm=bnjax.Renorm(...))` needs.
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
            f"num_features, affine, bias, track_running_stats, dtype and renorm.{hint}"
        )
    shape = feature_shape_from_num_features(num_features)
    params: Params = {}
    if affine:
        params = {"weight": jnp.ones(shape, dtype)}
        if bias:
            params["bias"] = jnp.zeros(shape, dtype)
    batch_stats: BatchStats = {}
    if track_running_stats:
        stats_dtype = jnp.promote_types(dtype, jnp.float32)  # float32, or float64
        batch_stats = {
            "running_mean": jnp.zeros(shape, stats_dtype),
            "running_var": jnp.ones(shape, stats_dtype),
            "num_batches_tracked": jnp.zeros((), jnp.int32),
        }
        if renorm:
            batch_stats.update(_renorm.init_stats(shape, stats_dtype))
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
    renorm: _renorm.Renorm | None = None,
    virtual_batch_size: int | None = None,
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
      renorm: `bnjax.Renorm(rmax, dmax, momentum)` for Batch Renormalization
        (training: `y = (x_hat r + d) weight + bias` with `r`, `d` from the renorm
        statistics, see `bnjax.Renorm`; eval unchanged), or None. Needs
        `batch_stats` from `bnjax.init(..., renorm=True)`.
      virtual_batch_size: the size V of the ghost batches: axis 0 is cut into
        sub-batches of V rows, each normalized with its own statistics; the running
        statistics get the mean of the ghosts' moments (docs/accumulation.md). Static.
        Ignored in evaluation with running statistics, which takes any batch size.

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
        renorm=renorm,
        virtual_batch_size=virtual_batch_size,
    )
    return y, update_stats(batch_stats, moments, momentum=momentum, renorm=renorm, eps=eps)


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
    renorm: _renorm.Renorm | None = None,
    virtual_batch_size: int | None = None,
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
      renorm: a `bnjax.Renorm` for Batch Renormalization, or None (see `apply`).
      virtual_batch_size: the ghost-batch size, or None (see `apply`). With ghost
        batches the moments are the ghosts' pooled ones (what `update_stats` needs).

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
    renorm = _renorm.check_renorm(renorm)
    _renorm.check_stats_keys(batch_stats, renorm)
    check_keys("batch_stats", batch_stats, STAT_KEYS + _renorm_keys(renorm, batch_stats))
    x = check_x(x, allow_1d=axis_name is not None)
    axes = normalize_axes(axis, x.shape)
    use_batch_stats = train or not batch_stats
    # Ghost batches shape batch statistics only: evaluation with running statistics
    # takes any batch size (as Keras does); the value itself is checked either way.
    virtual_batch_size = _ghost.check_virtual_batch_size(
        virtual_batch_size, x.shape if use_batch_stats else None, axes, "bnjax.apply"
    )
    features = feature_shape_of(x.shape, axes)
    _check_tree_shapes(params, batch_stats, features, x.shape, axes)
    _renorm.check_stats_shapes(batch_stats, features)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    if mask is not None:
        mask = check_mask(mask, x.shape, axes)

    if renorm is not None and train and not batch_stats:
        raise ValueError(
            "bnjax.apply: `renorm=` corrects the batch statistics towards the moving ones, "
            "so it needs running statistics; got batch_stats={}. Create them with "
            "`bnjax.init(num_features, renorm=True)` (track_running_stats=True)."
        )
    if use_batch_stats and mask is None and axis_name is None:
        n_static = int(np.prod([x.shape[a] for a in reduce_axes], dtype=np.int64))
        if virtual_batch_size is not None:
            n_static = n_static // (x.shape[0] // virtual_batch_size)
        if n_static == 1:
            raise ValueError(
                "bnjax.apply: expected more than 1 value per channel when training, "
                f"got input of shape {tuple(x.shape)} with feature axis {axis} "
                f"(1 value per feature). Use a batch of 2 or more, or train=False with "
                "running statistics."
            )

    weight, bias = params.get("weight"), params.get("bias")
    if use_batch_stats and (virtual_batch_size is not None or (renorm is not None and train)):
        return _normalize_extended(
            weight,
            bias,
            batch_stats,
            x,
            eps=eps,
            axis=axis,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            mask=mask,
            renorm=renorm if train else None,
            virtual_batch_size=virtual_batch_size,
        )
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
        and not _stats.sharded_explicitly(x, reduce_axes)
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
    renorm: _renorm.Renorm | None = None,
    eps: float = 1e-5,
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
      renorm: a `bnjax.Renorm`: also move `renorm_mean` / `renorm_std` towards the
        batch's mean and `sqrt(var + eps)` with `renorm.momentum`. None otherwise.
      eps: the layer's eps (used only with `renorm`).

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
    check_hyperparameters(momentum=momentum, eps=1.0 if renorm is None else eps)
    renorm = _renorm.check_renorm(renorm, "bnjax.update_stats")
    _renorm.check_stats_keys(batch_stats, renorm, "bnjax.update_stats")
    check_keys("batch_stats", batch_stats, STAT_KEYS + _renorm_keys(renorm, batch_stats))
    if moments is None or not batch_stats:
        return dict(batch_stats)
    if renorm is not None:
        base, extra = _renorm.split_stats(batch_stats)
        new = update_stats(base, moments, momentum=momentum)
        return {**new, **_renorm.update_stats(extra, moments, renorm, eps)}
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


def batch_moments(
    x: ArrayLike,
    reduce_axes: Sequence[int] | None = None,
    *,
    axis: int | Sequence[int] = -1,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> _stats.Moments:
    """Per-feature mean, biased variance and count of `x`, as `bnjax.normalize` computes them.

    `axis` names the feature axes, as everywhere in bnjax; the moments reduce over
    every other axis (and over `axis_name`). Numerics: a shifted one-pass formula
    that stays accurate for large means (see `docs/performance.md`).

    Args:
      x: the input.
      reduce_axes: deprecated: the axes to reduce over; pass `axis=` (the feature
        axes) instead.
      axis: the feature axis or axes (`-1` channels-last, `1` NCHW).
      mask: which samples count (see `bnjax.apply`), or None.
      axis_name: a named axis to synchronize over, or None.
      axis_index_groups: sub-groups of `axis_name`, or None.

    Returns:
      `bnjax.Moments(mean, var, count)`.

    Example:
      >>> m = bnjax.batch_moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
      >>> m.mean.tolist(), m.var.tolist(), int(m.count)
      ([2.0, 4.0], [1.0, 4.0], 2)
    """
    x = jnp.asarray(x)
    if reduce_axes is not None:
        deprecation.warn("bnjax.batch_moments(x, reduce_axes)", "bnjax.batch_moments(x, axis=...)")
        reduce = tuple(int(a) % x.ndim for a in reduce_axes)
    else:
        axes = normalize_axes(axis, x.shape)
        reduce = tuple(a for a in range(x.ndim) if a not in axes)
    return _stats.batch_moments(
        x, reduce, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )


def _trailing(v: Array, k: int) -> Array:
    """`v` with `k` trailing axes of size 1 (to broadcast over the features' axes)."""
    return jnp.reshape(v, jnp.shape(v) + (1,) * k) if k > 0 else v


def feature_shape_from_num_features(num_features: int | Sequence[int]) -> tuple[int, ...]:
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
                    + feature_mismatch_hint(tuple(x_shape), axes, shape)
                )
    if "num_batches_tracked" in batch_stats:
        nbt = batch_stats["num_batches_tracked"]
        if np.shape(nbt) != ():
            raise ValueError(
                "bnjax.apply: batch_stats['num_batches_tracked'] must be a scalar, "
                f"got shape {np.shape(nbt)}."
            )


def _renorm_keys(renorm: Any, batch_stats: Any) -> tuple[str, ...]:
    """The renorm keys `batch_stats` must also hold (none without `renorm`)."""
    return _renorm.RENORM_KEYS if renorm is not None and batch_stats else ()


def _normalize_extended(
    weight: Array | None,
    bias: Array | None,
    batch_stats: BatchStats,
    x: Array,
    *,
    eps: float,
    axis: Any,
    axis_name: Any,
    axis_index_groups: Any,
    mask: Array | None,
    renorm: _renorm.Renorm | None,
    virtual_batch_size: int | None,
) -> tuple[Array, _stats.Moments]:
    """`normalize` with batch statistics, Batch Renormalization and/or ghost batches.

    Both options are built from the plain step: ghost batches are `jax.vmap` of it
    over the sub-batches, renorm is the plain step with the corrected parameters
    `(r w, d w + b)`, r and d computed from a first (gradient-free) pass of moments.
    """
    opts = dict(eps=eps, axis=axis, axis_index_groups=axis_index_groups)

    def moments_of(x_, params):
        if virtual_batch_size is None:
            return normalize(params, {}, x_, True, axis_name=axis_name, mask=mask, **opts)
        xg, mg = _ghost.split(x_, mask, virtual_batch_size)

        def one(xi, mi):  # one ghost batch (x's rank): plain BatchNorm, its own statistics
            return normalize(params, {}, xi, True, mask=mi, **opts)

        yg, gm = jax.vmap(one)(xg, mg)
        pooled = _ghost.pool(gm, axis_name=axis_name, axis_index_groups=axis_index_groups)
        return yg.reshape(x_.shape), pooled

    params: Params = {}
    if weight is not None:
        params["weight"] = weight
        if bias is not None:
            params["bias"] = bias
    if renorm is None:
        return moments_of(x, params)
    # Pass 1: the batch moments for r and d only (no gradient, no y kept), computed as
    # a training step computes them (shifted sums): not through the forward-only
    # primal, whose plain sums would change r and d inside a training step.
    m0 = _pass_one_moments(
        jax.lax.stop_gradient(x), mask, axis, axis_name, axis_index_groups, virtual_batch_size
    )
    base, extra = _renorm.split_stats(batch_stats)
    r, d = _renorm.correction(m0, extra, base["num_batches_tracked"], renorm, eps)
    return moments_of(x, _renorm.corrected_params(weight, bias, r, d))


def _pass_one_moments(
    x: Array,
    mask: Array | None,
    axis: Any,
    axis_name: Any,
    axis_index_groups: Any,
    virtual_batch_size: int | None,
) -> _stats.Moments:
    """Batch Renormalization's gradient-free batch moments (pooled over ghost batches)."""
    axes = normalize_axes(axis, x.shape)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    if virtual_batch_size is None:
        return _stats.batch_moments(
            x, reduce_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
        )
    xg, mg = _ghost.split(x, mask, virtual_batch_size)
    gm = jax.vmap(lambda xi, mi: _stats.batch_moments(xi, reduce_axes, mask=mi))(xg, mg)
    return _ghost.pool(gm, axis_name=axis_name, axis_index_groups=axis_index_groups)
