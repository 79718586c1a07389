"""Precise BatchNorm: recompute running statistics over many batches after training.

Two algorithms, both over a bounded stream of batches, both training-mode forwards
(each BatchNorm normalizes with its batch's statistics, so every BatchNorm's input,
and so its batch moments, do not depend on any running statistics):

- `update_bn`, PyTorch's `torch.optim.swa_utils.update_bn` (and fvcore's precise
  BN): reset the running statistics, then run every batch with `momentum=None`,
  the cumulative average. Each *batch* gets the same weight 1/B:
  `running_mean = mean_b(mean_b)`, `running_var = mean_b(var_b * n_b / (n_b - 1))`.
- `precise_bn(..., pooled=True)`: the statistics of all the elements pooled
  together, as if the B batches were one: per-batch `(n_b, mean_b, M2_b)` combined
  with Chan et al.'s parallel formula in float64 on the host,
  `running_var = M2 / (N - 1)`. It differs from the equal-weight average when the
  batches have different sizes (a smaller last batch weighs as much as a full one in
  `update_bn`) and by the spread of the batch means (the equal-weight variance
  averages within-batch variances only; the pooled one also counts the variance
  *between* batch means).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _core, _stats
from bnjax._validate import normalize_axes

BatchStatsTree = Any
_STAT_KEYS = frozenset(_core.STAT_KEYS)


def update_bn(
    apply_fn: Callable[[Any, BatchStatsTree, Any], BatchStatsTree],
    params: Any,
    batch_stats: BatchStatsTree,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
    check_momentum: bool = True,
) -> BatchStatsTree:
    """Recomputes every BatchNorm's running statistics, as `torch.optim.swa_utils.update_bn`.

    Every BatchNorm's statistics are reset (mean 0, var 1, count 0) and the batches
    are run through `apply_fn` in order, threading the statistics; with
    `momentum=None` each BatchNorm keeps the cumulative average, so each batch has
    weight 1/B: `running_mean = mean_b(mean_b)`,
    `running_var = mean_b(var_b * n_b / (n_b - 1))`, `num_batches_tracked = B`.

    Args:
      apply_fn: `apply_fn(params, batch_stats, batch) -> new_batch_stats`, the
        model's training-mode forward whose BatchNorms all use **`momentum=None`**
        (as `update_bn` sets on PyTorch modules). It is `jax.jit`-compiled once.
      params: the model's parameters, passed through unchanged.
      batch_stats: the model's statistics tree; every mapping with exactly the keys
        `running_mean`, `running_var`, `num_batches_tracked` is a BatchNorm and is
        reset. Not modified.
      batches: an iterable of batches (pytrees of arrays), e.g. a data loader.
      num_batches: use at most this many batches (`None`: all of them).
      progress: show a `tqdm` progress bar (when tqdm is installed).
      check_momentum: run the first batch from two different reset states and raise
        if the results differ, which means some BatchNorm does not use
        `momentum=None` (one extra forward).

    Returns:
      The new statistics tree, of `batch_stats`'s structure.

    Raises:
      ValueError: no batch, no BatchNorm statistics in `batch_stats`, `apply_fn`
        returns another structure, or (with `check_momentum`) some BatchNorm does
        not use `momentum=None`.

    Example:
      >>> def apply_fn(params, stats, x):
      ...     return {"bn": bnjax.apply(params["bn"], stats["bn"], x, True, momentum=None)[1]}
      >>> p, s = bnjax.init(2)
      >>> batches = [jnp.ones((4, 2)), 3 * jnp.ones((4, 2))]
      >>> update_bn(apply_fn, {"bn": p}, {"bn": s}, batches, progress=False)["bn"]["running_mean"]
      Array([2., 2.], dtype=float32)
    """
    _check_num_batches(num_batches)
    fresh = _reset(batch_stats, var=1.0)
    step = jax.jit(apply_fn)
    stats = fresh
    seen = 0
    for batch in _bounded(batches, num_batches, progress, "update_bn"):
        if seen == 0 and check_momentum:
            _check_cumulative(step, params, batch, fresh)
        new_stats = step(params, stats, batch)
        _check_same_structure(stats, new_stats, "update_bn")
        stats = new_stats
        seen += 1
    if seen == 0:
        raise ValueError("update_bn: `batches` yielded no batch.")
    return stats


def precise_bn(
    apply_fn: Callable[[Any, BatchStatsTree, Any, Callable[..., Any]], BatchStatsTree],
    params: Any,
    batch_stats: BatchStatsTree,
    batches: Iterable[Any],
    *,
    pooled: bool = True,
    num_batches: int | None = None,
    progress: bool = True,
) -> BatchStatsTree:
    """Recomputes every BatchNorm's running statistics exactly, pooled over all elements.

    `apply_fn` receives a BatchNorm function `bn` with `bnjax.apply`'s signature and
    must use it for every BatchNorm. In training mode `bn` normalizes exactly as
    `bnjax.apply` does and, in place of updated statistics, returns that batch's
    `bnjax.Moments` (mean, biased var, count). The helper collects them per
    BatchNorm and combines them on the host in float64:

    - `pooled=True`: Chan's parallel combination of `(n_b, mean_b, M2_b = n_b var_b)`,
      i.e. the statistics of all elements of all batches together;
      `running_var = M2 / (N - 1)` (unbiased, PyTorch's convention).
    - `pooled=False`: equal weight per batch, `update_bn`'s (PyTorch's) numbers
      computed without float32 cumulative rounding.

    `num_batches_tracked` becomes the number of batches, as after `update_bn`.

    Args:
      apply_fn: `apply_fn(params, batch_stats, batch, bn) -> new_batch_stats`, the
        model's training-mode forward with `bn` in place of `bnjax.apply`; it must
        thread each BatchNorm's statistics entry through `bn` unchanged (the entry
        `bn` returns is a `bnjax.Moments`, not a statistics dict). It is
        `jax.jit`-compiled once.
      params: the model's parameters, passed through unchanged.
      batch_stats: the model's statistics tree (mappings with `running_mean`,
        `running_var`, `num_batches_tracked` are BatchNorms). Not modified.
      batches: an iterable of batches (pytrees of arrays).
      pooled: pool all elements (True) or weigh each batch equally (False).
      num_batches: use at most this many batches (`None`: all of them).
      progress: show a `tqdm` progress bar (when tqdm is installed).

    Returns:
      The new statistics tree, of `batch_stats`'s structure and dtypes.

    Raises:
      ValueError: no batch; `bn` was called with `train=False`; a BatchNorm of
        `batch_stats` was never run through `bn`, or `bn` ran at a place that is not a
        BatchNorm of `batch_stats`; a BatchNorm saw fewer than 2 values in all.

    Example:
      >>> def apply_fn(params, stats, x, bn):
      ...     return {"bn": bn(params["bn"], stats["bn"], x, True)[1]}
      >>> p, s = bnjax.init(1)
      >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0], [8.0], [10.0]])]
      >>> new = precise_bn(apply_fn, {"bn": p}, {"bn": s}, batches, progress=False)
      >>> new["bn"]["running_mean"]   # (0+2+4+6+8+10) / 6; equal weight would give 4.0
      Array([5.], dtype=float32)
    """
    _check_num_batches(num_batches)
    if not any(_is_stats(s) for s in _stat_dicts(batch_stats)):
        raise ValueError(_no_stats_message("precise_bn", batch_stats))
    step = jax.jit(functools.partial(_call_with_collector, apply_fn))
    acc: dict[tuple[Any, ...], _Accumulator] = {}
    seen = 0
    for batch in _bounded(batches, num_batches, progress, "precise_bn"):
        out = step(params, batch_stats, batch)
        leaves = jax.tree_util.tree_flatten_with_path(
            out, is_leaf=lambda v: isinstance(v, _stats.Moments)
        )[0]
        for path, m in leaves:
            if isinstance(m, _stats.Moments):
                acc.setdefault(path, _Accumulator()).add(m)
        seen += 1
    if seen == 0:
        raise ValueError("precise_bn: `batches` yielded no batch.")

    def finish(path: tuple[Any, ...], node: Any) -> Any:
        if not _is_stats(node):
            return node
        if path not in acc:
            raise ValueError(
                f"precise_bn: the BatchNorm at {jax.tree_util.keystr(path)} was never run "
                "through `bn`; apply_fn must call the `bn` it is given (not bnjax.apply) "
                "for every BatchNorm, with its statistics entry."
            )
        mean, var = acc.pop(path).result(pooled, jax.tree_util.keystr(path))
        return {
            "running_mean": jnp.asarray(mean, node["running_mean"].dtype),
            "running_var": jnp.asarray(var, node["running_var"].dtype),
            "num_batches_tracked": jnp.asarray(
                seen, jnp.asarray(node["num_batches_tracked"]).dtype
            ),
        }

    result = jax.tree_util.tree_map_with_path(finish, batch_stats, is_leaf=_is_stats)
    if acc:
        raise ValueError(
            "precise_bn: `bn` ran at "
            f"{', '.join(jax.tree_util.keystr(p) for p in acc)}, which is not a BatchNorm "
            "statistics entry of batch_stats (a mapping with running_mean, running_var, "
            "num_batches_tracked). Return each BatchNorm's entry at its own place."
        )
    return result


# --- the collecting BatchNorm used by precise_bn.


def _collecting_bn(
    params: Any,
    batch_stats: Any,
    x: Any,
    train: bool,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: Any = -1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: Any = None,
) -> tuple[jax.Array, Any]:
    """`bnjax.apply` in training mode that returns the batch's Moments as its 'statistics'."""
    if train is not True:
        raise ValueError(
            "precise_bn: the `bn` given to apply_fn was called with train="
            f"{train!r}; precise BN runs the model in training mode (batch statistics). "
            "Pass train=True in apply_fn."
        )
    y, _ = _core.apply(
        params,
        batch_stats,
        x,
        True,
        momentum=momentum,
        eps=eps,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
    )
    if not batch_stats:  # track_running_stats=False: nothing to recompute
        return y, batch_stats
    x = jnp.asarray(x)
    axes = normalize_axes(axis, x.shape)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    m = _stats.batch_moments(
        x,
        reduce_axes,
        mask=None if mask is None else jnp.asarray(mask),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
    return y, _stats.Moments(m.mean, m.var, jnp.asarray(m.count, jnp.int32))


def _call_with_collector(apply_fn: Callable[..., Any], params: Any, stats: Any, batch: Any) -> Any:
    return apply_fn(params, stats, batch, _collecting_bn)


class _Accumulator:
    """Per-BatchNorm float64 host accumulators for both precise-BN variants."""

    def __init__(self) -> None:
        self.n = 0.0  # pooled: total count
        self.mean: np.ndarray | float = 0.0  # pooled mean
        self.m2: np.ndarray | float = 0.0  # pooled sum of squared deviations
        self.batches = 0  # equal weight: batches with >= 2 values
        self.sum_mean: np.ndarray | float = 0.0
        self.sum_uvar: np.ndarray | float = 0.0

    def add(self, m: _stats.Moments) -> None:
        n_b = float(np.asarray(m.count))
        if n_b == 0:
            return
        mean_b = np.asarray(m.mean, np.float64)
        m2_b = np.asarray(m.var, np.float64) * n_b
        # Chan, Golub & LeVeque: combine (n, mean, M2) of two disjoint sets.
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n
        if n_b >= 2:  # as bnjax.apply / PyTorch: a batch of < 2 values changes nothing
            self.batches += 1
            self.sum_mean = self.sum_mean + mean_b
            self.sum_uvar = self.sum_uvar + m2_b / (n_b - 1)

    def result(self, pooled: bool, where: str) -> tuple[np.ndarray, np.ndarray]:
        if (pooled and self.n < 2) or (not pooled and self.batches == 0):
            raise ValueError(
                f"precise_bn: the BatchNorm at {where} saw fewer than 2 values "
                f"{'in all' if pooled else 'in every batch'}; its variance is undefined."
            )
        if pooled:
            return np.asarray(self.mean), np.asarray(self.m2) / (self.n - 1)
        return np.asarray(self.sum_mean) / self.batches, np.asarray(self.sum_uvar) / self.batches


# --- helpers shared by both.


def _is_stats(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == _STAT_KEYS


def _stat_dicts(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree, is_leaf=_is_stats)


def _no_stats_message(who: str, tree: Any) -> str:
    return (
        f"{who}: batch_stats has no BatchNorm statistics (a mapping with exactly the keys "
        f"running_mean, running_var, num_batches_tracked); got structure "
        f"{jax.tree_util.tree_structure(tree)}."
    )


def _reset(batch_stats: Any, *, var: float) -> Any:
    """A copy of the tree with every BatchNorm's statistics reset (as PyTorch does)."""
    if not any(_is_stats(s) for s in _stat_dicts(batch_stats)):
        raise ValueError(_no_stats_message("update_bn", batch_stats))

    def reset(node: Any) -> Any:
        if not _is_stats(node):
            return node
        return {
            "running_mean": jnp.zeros_like(node["running_mean"]),
            "running_var": jnp.full_like(node["running_var"], var),
            "num_batches_tracked": jnp.zeros_like(node["num_batches_tracked"]),
        }

    return jax.tree_util.tree_map(reset, batch_stats, is_leaf=_is_stats)


def _check_cumulative(step: Callable[..., Any], params: Any, batch: Any, fresh: Any) -> None:
    """From `num_batches_tracked = 0`, momentum=None gives weight 1 to the batch, so the
    result cannot depend on the statistics it starts from; any other momentum does."""
    other = jax.tree_util.tree_map(
        lambda node: (
            dict(node, running_mean=node["running_mean"] + 1, running_var=node["running_var"] + 1)
            if _is_stats(node)
            else node
        ),
        fresh,
        is_leaf=_is_stats,
    )
    a = step(params, fresh, batch)
    b = step(params, other, batch)
    _check_same_structure(fresh, a, "update_bn")
    bad = [
        jax.tree_util.keystr(path)
        for (path, x), y in zip(
            jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True
        )
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]
    if bad:
        raise ValueError(
            "update_bn: the statistics at "
            f"{', '.join(bad)} depend on the state they start from, so that BatchNorm does "
            "not use momentum=None (the cumulative average update_bn needs), or it saw "
            "fewer than 2 values in the first batch. Build apply_fn with "
            "bnjax.apply(..., momentum=None), or use precise_bn, which needs no momentum."
        )


def _check_same_structure(before: Any, after: Any, who: str) -> None:
    s0, s1 = jax.tree_util.tree_structure(before), jax.tree_util.tree_structure(after)
    if s0 != s1:
        raise ValueError(
            f"{who}: apply_fn must return the new batch_stats with the structure of the "
            f"batch_stats it is given; got {s1}, expected {s0}."
        )


def _check_num_batches(num_batches: int | None) -> None:
    if num_batches is not None and (
        not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}.")


def _bounded(batches: Iterable[Any], num_batches: int | None, progress: bool, desc: str):
    it: Iterable[Any] = batches if num_batches is None else itertools.islice(batches, num_batches)
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional
        return it
    total = num_batches
    try:
        total = len(batches) if num_batches is None else min(num_batches, len(batches))  # type: ignore[arg-type]
    except TypeError:
        pass
    return tqdm(it, total=total, desc=desc, unit="batch")
