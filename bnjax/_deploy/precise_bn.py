"""Precise BatchNorm: recompute running statistics over many batches after training.

Two algorithms, both over a bounded stream of batches, both training-mode forwards
(each BatchNorm normalizes with its batch's statistics, so every BatchNorm's input,
and so its batch moments, do not depend on any running statistics):

- `update_bn`, PyTorch's `torch.optim.swa_utils.update_bn` (and fvcore's precise
  BN): every *batch* gets the same weight 1/B:
  `running_mean = mean_b(mean_b)`, `running_var = mean_b(var_b * n_b / (n_b - 1))`.
- `precise_bn(..., pooled=True)`: the statistics of all the elements pooled
  together, as if the B batches were one: per-batch `(n_b, mean_b, M2_b)` combined
  with Chan et al.'s parallel formula in float64 on the host,
  `running_var = M2 / (N - 1)`. It differs from the equal-weight average when the
  batches have different sizes (a smaller last batch weighs as much as a full one in
  `update_bn`) and by the spread of the batch means (the equal-weight variance
  averages within-batch variances only; the pooled one also counts the variance
  *between* batch means).

Both run on the model itself, whatever its kind: a `flax.linen` module and its
variables, a `flax.nnx` module, or a functional `apply_fn`. Each BatchNorm's batch
moments come through `bnjax.BatchNormReport` (the model layer, `_model/run.py`), are
combined on the host in float64, and are written back where the model keeps its
statistics (`_model/tree.py`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._core import deprecation
from bnjax._core.conventions import to_plain_dict
from bnjax._core.report import BatchNormReport
from bnjax._model.run import (
    missing_reports_message,
    model_kind,
    reporting_bn,
    run_functional,
    run_linen,
    run_nnx,
)
from bnjax._model.tree import KeyPath, replace, reports_at, stats_at, write_nnx
from bnjax._model.tree import path_name as name


def update_bn(
    model: Any,
    *args: Any,
    num_batches: int | None = None,
    progress: bool = True,
    check_momentum: bool = True,
    inputs: Callable[[Any], tuple[Any, ...]] | None = None,
    skip_nonfinite: bool = False,
    **call_kwargs: Any,
) -> Any:
    """Deprecated: `precise_bn(..., pooled=False)` gives these numbers on every kind of model.

    Recomputes every BatchNorm's running statistics, as `torch.optim.swa_utils.update_bn`.

    Each batch weighs 1/B: `running_mean = mean_b(mean_b)`,
    `running_var = mean_b(var_b * n_b / (n_b - 1))`, `num_batches_tracked = B`;
    the old statistics play no part. Three kinds of model:

    - linen: `update_bn(module, variables, batches, train=True)` returns new
      `variables` (the `batch_stats` collection replaced). Keyword arguments go to
      `module.apply` (default `train=True`).
    - nnx: `update_bn(model, batches)` writes the statistics into `model`'s
      BatchNorms and returns `model`. Its BatchNorms run in training mode (the
      rest of the model keeps its mode); keyword arguments go to its call.
    - functional: `update_bn(apply_fn, params, batch_stats, batches)` with
      `apply_fn(params, batch_stats, batch) -> new_batch_stats`, the training-mode
      forward whose BatchNorms all use **`momentum=None`** (as `update_bn` sets on
      PyTorch modules); the statistics are reset (mean 0, var 1, count 0) and
      threaded through the batches. (A functional model that takes a `bn`
      argument: `precise_bn(..., pooled=False)` gives the same numbers.)

    The linen and nnx routes read each BatchNorm's moments through its
    `bnjax.BatchNormReport` and average them in float64, whatever the layers'
    momentum: no second model, no `momentum=None`.

    Args:
      model: a `flax.linen.Module`, a `flax.nnx.Module` or a functional `apply_fn`.
      *args: linen: `variables, batches`; nnx: `batches`; functional: `params,
        batch_stats, batches`. `batches` is an iterable of batches (pytrees).
      num_batches: use at most this many batches (`None`: all of them).
      progress: show a `tqdm` progress bar (when tqdm is installed).
      check_momentum: functional route only: run the first batch from two different
        reset states and raise if the results differ (some BatchNorm does not use
        `momentum=None`).
      inputs: linen and nnx: `inputs(batch) -> tuple` of the model's positional
        arguments (default: the batch is the one argument).
      skip_nonfinite: leave out a batch whose BatchNorm moments (functional: new
        statistics) are not finite, and say how many were left out in a
        `RuntimeWarning`; `num_batches_tracked` counts the batches used. Default:
        such a batch raises (it is never averaged in).
      **call_kwargs: linen and nnx: keyword arguments of the model's call.

    Returns:
      linen: new variables; nnx: `model`, updated in place; functional: the new
      statistics tree, of `batch_stats`'s structure.

    Raises:
      ValueError: no batch; no BatchNorm statistics; a BatchNorm that ran in eval
        mode or reported nothing (e.g. `nn.scan` without `bnjax.linen.REPORTS` in
        `variable_axes`); (functional) a structure change or a fixed momentum; a
        batch with non-finite moments (without `skip_nonfinite`), or no finite
        batch at all.

    Example:
      >>> def apply_fn(params, stats, x):
      ...     return {"bn": bnjax.apply(params["bn"], stats["bn"], x, True, momentum=None)[1]}
      >>> p, s = bnjax.init(2)
      >>> batches = [jnp.ones((4, 2)), 3 * jnp.ones((4, 2))]
      >>> import warnings
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore", DeprecationWarning)
      ...     new = update_bn(apply_fn, {"bn": p}, {"bn": s}, batches, progress=False)
      >>> new["bn"]["running_mean"]
      Array([2., 2.], dtype=float32)
    """
    deprecation.warn(
        "bnjax.deploy.update_bn",
        "bnjax.deploy.precise_bn(..., pooled=False), the same numbers (a functional model "
        "then takes `bn` and returns (outputs, new_batch_stats))",
    )
    _check_num_batches(num_batches)
    kind = model_kind(model, "update_bn")
    _check_skip(skip_nonfinite)
    if kind != "functional":
        return _recompute(
            "update_bn",
            kind,
            model,
            args,
            False,
            num_batches,
            progress,
            inputs,
            call_kwargs,
            skip_nonfinite,
        )
    apply_fn = model
    params, batch_stats, batches = _unpack_functional("update_bn", args, call_kwargs)
    fresh = _reset(batch_stats, var=1.0)
    step = jax.jit(apply_fn)
    stats = fresh
    seen, skipped = 0, []
    for i, batch in enumerate(_bounded(batches, num_batches, progress, "update_bn")):
        new_stats = step(params, stats, batch)
        _check_same_structure(stats, new_stats, "update_bn")
        bad = _nonfinite_stats(new_stats)
        if bad:
            _nonfinite_batch("update_bn", i, bad, skip_nonfinite)
            skipped.append(i)
            continue
        if seen == 0 and check_momentum:
            _check_cumulative(step, params, batch, fresh)
        stats = new_stats
        seen += 1
    _check_seen("update_bn", seen, skipped)
    return stats


def precise_bn(
    model: Any,
    *args: Any,
    pooled: bool = True,
    num_batches: int | None = None,
    progress: bool = True,
    inputs: Callable[[Any], tuple[Any, ...]] | None = None,
    skip_nonfinite: bool = False,
    **call_kwargs: Any,
) -> Any:
    """Recomputes every BatchNorm's running statistics exactly, pooled over all elements.

    Each BatchNorm's batch moments (mean, biased var, count) are collected per batch
    and combined on the host in float64:

    - `pooled=True`: Chan's parallel combination of `(n_b, mean_b, M2_b = n_b var_b)`,
      i.e. the statistics of all elements of all batches together;
      `running_var = M2 / (N - 1)` (unbiased, PyTorch's convention).
    - `pooled=False`: equal weight per batch, `update_bn`'s (PyTorch's) numbers
      computed without float32 cumulative rounding.

    `num_batches_tracked` becomes the number of batches, as after `update_bn`.
    Three kinds of model:

    - linen: `precise_bn(module, variables, batches, train=True)` returns new
      `variables`; the moments come from `bnjax.linen.REPORTS`.
    - nnx: `precise_bn(model, batches)` writes the statistics into `model`'s
      BatchNorms (which run in training mode) and returns `model`.
    - functional: `precise_bn(apply_fn, params, batch_stats, batches)` with
      `apply_fn(params, batch_stats, *inputs, bn) -> (outputs, new_batch_stats)`
      (the one signature of a functional model, as for `fold`), the training-mode
      forward with `bn` (`bnjax.apply`'s signature, every option included) for
      every BatchNorm. `bn` normalizes exactly as `bnjax.apply` does and returns the
      batch's `bnjax.BatchNormReport` in place of the new statistics; return it at
      the BatchNorm's place (a model of `bnjax.batch_norm` layers may return each
      layer's `layer.report(moments)` there instead). Returns the new statistics.
      (An `apply_fn` that returns only the new statistics still works this release,
      with a `DeprecationWarning`.)

    Args:
      model: a `flax.linen.Module`, a `flax.nnx.Module` or a functional `apply_fn`.
      *args: linen: `variables, batches`; nnx: `batches`; functional: `params,
        batch_stats, batches`. `batches` is an iterable of batches (pytrees).
      pooled: pool all elements (True) or weigh each batch equally (False).
      num_batches: use at most this many batches (`None`: all of them).
      progress: show a `tqdm` progress bar (when tqdm is installed).
      inputs: `inputs(batch) -> tuple` of the model's positional arguments after
        the variables (default: the batch is the one argument).
      skip_nonfinite: leave out a batch whose moments are not finite at some
        BatchNorm (every BatchNorm leaves it out), and say how many were left out
        in a `RuntimeWarning`; `num_batches_tracked` counts the batches used.
        Default: such a batch raises (it is never averaged in).
      **call_kwargs: linen and nnx: keyword arguments of the model's call (linen
        default: `train=True`).

    Returns:
      linen: new variables; nnx: `model`, updated in place; functional: the new
      statistics tree, of `batch_stats`'s structure and dtypes.

    Raises:
      ValueError: no batch; a BatchNorm ran in eval mode; a BatchNorm of the model
        reported nothing (functional: was never run through `bn`), or a report at a
        place that holds no statistics; a BatchNorm saw fewer than 2 values in all;
        a batch with non-finite moments (without `skip_nonfinite`), or no finite
        batch at all.

    Example:
      >>> def apply_fn(params, stats, x, bn):
      ...     y, new = bn(params["bn"], stats["bn"], x, True)
      ...     return y, {"bn": new}
      >>> p, s = bnjax.init(1)
      >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0], [8.0], [10.0]])]
      >>> new = precise_bn(apply_fn, {"bn": p}, {"bn": s}, batches, progress=False)
      >>> new["bn"]["running_mean"]   # (0+2+4+6+8+10) / 6; equal weight would give 4.0
      Array([5.], dtype=float32)
    """
    _check_num_batches(num_batches)
    _check_skip(skip_nonfinite)
    kind = model_kind(model, "precise_bn")
    return _recompute(
        "precise_bn",
        kind,
        model,
        args,
        pooled,
        num_batches,
        progress,
        inputs,
        call_kwargs,
        skip_nonfinite,
    )


# --- one recomputation for every kind of model.


def _recompute(
    who, kind, model, args, pooled, num_batches, progress, inputs, call_kwargs, skip_nonfinite
):
    if kind == "functional":
        params, batch_stats, batches = _unpack_functional(who, args, call_kwargs)
        to_args = inputs or (lambda batch: (batch,))

        @jax.jit
        def reports(p, s, batch):
            return run_functional(model, p, s, to_args(batch), {}, reporting_bn, who).reports

        def step(batch):
            return reports(params, batch_stats, batch)

    elif kind == "linen":
        if len(args) != 2:
            raise ValueError(
                f"{who}: a linen model is called as {who}(module, variables, batches)."
            )
        variables, batches = args
        step, batch_stats = _linen_step(model, variables, inputs, call_kwargs)
    else:
        if len(args) != 1:
            raise ValueError(f"{who}: an nnx model is called as {who}(model, batches).")
        (batches,) = args
        step, batch_stats = _nnx_step(model, inputs, call_kwargs)

    targets = stats_at(batch_stats)
    if not targets:
        raise ValueError(_no_stats_message(who, batch_stats))
    acc: dict[KeyPath, _Accumulator] = {}
    seen, skipped = 0, []
    for i, batch in enumerate(_bounded(batches, num_batches, progress, who)):
        used = {}
        for path, report in reports_at(step(batch)).items():
            if not report.trained:
                raise ValueError(
                    f"{who}: the BatchNorm at {name(path)} ran in eval mode (running "
                    "statistics); precise BN runs the model in training mode (batch "
                    "statistics): pass train=True (linen), or call `bn` with train=True "
                    "(functional)."
                )
            if path not in targets:
                if report.config.track_running_stats and kind == "functional":
                    raise ValueError(
                        f"{who}: `bn` ran at {name(path)}, which is not a BatchNorm "
                        "statistics entry of batch_stats (a mapping with running_mean, "
                        "running_var, num_batches_tracked). Return each BatchNorm's entry at "
                        "its own place."
                    )
                continue
            used[path] = report
        # A batch counts for every BatchNorm or for none (it is the batch that is bad).
        bad = [
            name(p)
            for p, r in used.items()
            if not (np.all(np.isfinite(r.mean)) and np.all(np.isfinite(r.var)))
        ]
        if bad:
            _nonfinite_batch(who, i, bad, skip_nonfinite)
            skipped.append(i)
            continue
        for path, report in used.items():
            feature_ndim = np.ndim(targets[path]["running_mean"])
            acc.setdefault(path, _Accumulator()).add(report, feature_ndim)
        seen += 1
    _check_seen(who, seen, skipped)
    missing = [p for p in targets if p not in acc]
    if missing:
        raise ValueError(missing_reports_message(who, missing, kind))

    new = {p: acc[p].result(pooled, f"{who}: the BatchNorm at {name(p)}") for p in targets}
    new_stats = {
        # Other keys (Batch Renormalization's renorm_mean/renorm_std, training-time
        # only) are kept as they are: precise BN recomputes what eval mode reads.
        p: dict(
            s,
            running_mean=jnp.asarray(new[p][0], s["running_mean"].dtype),
            running_var=jnp.asarray(new[p][1], s["running_var"].dtype),
            num_batches_tracked=jnp.full(
                np.shape(s["num_batches_tracked"]),
                seen * acc[p].calls_per_batch(seen),
                jnp.asarray(s["num_batches_tracked"]).dtype,
            ),
        )
        for p, s in targets.items()
    }
    if kind == "nnx":
        return write_nnx(model, new_stats)
    result = replace(batch_stats, new_stats)
    if kind == "linen":
        return {**args[0], "batch_stats": result}
    return result


def _unpack_functional(who, args, call_kwargs):
    if call_kwargs or len(args) != 3:
        raise ValueError(
            f"{who}: a functional model is called as {who}(apply_fn, params, batch_stats, "
            f"batches); got {len(args)} positional arguments after apply_fn"
            + (f" and keyword arguments {sorted(call_kwargs)}." if call_kwargs else ".")
        )
    return args


def _linen_step(module, variables, inputs, call_kwargs):
    kwargs = dict(call_kwargs) if call_kwargs else {"train": True}
    to_args = inputs or (lambda batch: (batch,))

    @jax.jit
    def reports(variables, batch):
        return run_linen(module, variables, to_args(batch), kwargs).reports

    batch_stats = to_plain_dict(variables).get("batch_stats", {})
    return (lambda batch: reports(variables, batch)), batch_stats


def _nnx_step(model, inputs, call_kwargs):
    from flax import nnx

    from bnjax._flax import nnx as bnnnx

    to_args = inputs or (lambda batch: (batch,))
    graphdef, state = nnx.split(model)

    @jax.jit
    def reports(state, batch):
        m = nnx.merge(graphdef, state)
        bns = [node for _, node in nnx.iter_graph(m) if isinstance(node, bnnnx.BatchNorm)]
        for bn in bns:
            bn.use_running_average = False  # on this copy only
        return run_nnx(m, to_args(batch), call_kwargs).reports, nnx.state(m)

    threaded = [state]  # the copy's state goes on from batch to batch (e.g. RNG counters)

    def step(batch):
        out, threaded[0] = reports(threaded[0], batch)
        return out

    batch_stats = to_plain_dict(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    return step, batch_stats


class _Accumulator:
    """Per-BatchNorm float64 host accumulators for both precise-BN variants.

    A report's leading axes beyond the statistics' own shape are several calls of
    the layer in one forward (a shared layer): each call counts as a batch.
    """

    def __init__(self) -> None:
        self.n: np.ndarray | float = 0.0  # pooled: total count
        self.mean: np.ndarray | float = 0.0  # pooled mean
        self.m2: np.ndarray | float = 0.0  # pooled sum of squared deviations
        self.batches: np.ndarray | float = 0.0  # equal weight: batches with >= 2 values
        self.sum_mean: np.ndarray | float = 0.0
        self.sum_uvar: np.ndarray | float = 0.0
        self.calls = 0  # calls seen in all

    def add(self, report: BatchNormReport, feature_ndim: int) -> None:
        mean = np.asarray(report.mean, np.float64)
        var = np.asarray(report.var, np.float64)
        count = np.asarray(report.count, np.float64)
        calls = mean.ndim - feature_ndim  # leading axes: calls of a shared layer
        mean = mean.reshape(-1, *mean.shape[calls:])
        var = var.reshape(mean.shape)
        count = count.reshape(mean.shape[0], *count.shape[calls:])
        for m, v, c in zip(mean, var, count, strict=True):
            self._add_one(m, v, c.reshape(c.shape + (1,) * (m.ndim - c.ndim)))
            self.calls += 1

    def _add_one(self, mean_b: np.ndarray, var_b: np.ndarray, n_b: np.ndarray) -> None:
        # Chan, Golub & LeVeque: combine (n, mean, M2) of two disjoint sets.
        m2_b = var_b * n_b
        n = self.n + n_b
        safe = np.where(n > 0, n, 1.0)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / safe)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / safe)
        self.n = n
        # As bnjax.apply / PyTorch: a batch of < 2 values changes nothing.
        ok = n_b >= 2
        self.batches = self.batches + ok
        self.sum_mean = self.sum_mean + np.where(ok, mean_b, 0.0)
        self.sum_uvar = self.sum_uvar + np.where(ok, m2_b / np.maximum(n_b - 1, 1), 0.0)

    def calls_per_batch(self, batches: int) -> int:
        return max(1, self.calls // max(batches, 1))

    def result(self, pooled: bool, where: str) -> tuple[np.ndarray, np.ndarray]:
        if (pooled and np.any(self.n < 2)) or (not pooled and np.any(self.batches == 0)):
            raise ValueError(
                f"{where} saw fewer than 2 values "
                f"{'in all' if pooled else 'in every batch'}; its variance is undefined."
            )
        shape = np.shape(self.mean)
        if pooled:
            var = np.asarray(self.m2) / (np.asarray(self.n) - 1)
            return np.asarray(self.mean), np.broadcast_to(var, shape)
        mean = np.asarray(self.sum_mean) / self.batches
        return mean, np.broadcast_to(np.asarray(self.sum_uvar) / self.batches, np.shape(mean))


# --- non-finite batches: raised, or skipped and counted.


def _check_skip(skip_nonfinite: Any) -> None:
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}.")


def _nonfinite_stats(tree: Any) -> list[str]:
    """The BatchNorm statistics entries of `tree` holding a value that is not finite."""
    return [
        name(path)
        for path, node in stats_at(tree).items()
        if not all(
            np.all(np.isfinite(np.asarray(v)))
            for k, v in node.items()
            if k != "num_batches_tracked"
        )
    ]


def _nonfinite_batch(who: str, index: int, where: list[str], skip: bool) -> None:
    if skip:
        return
    raise ValueError(
        f"{who}: batch {index} gave BatchNorm moments that are not finite (NaN or inf) "
        f"at {', '.join(where)}; they would poison the recomputed statistics. Fix the "
        "data, or pass skip_nonfinite=True to leave such batches out (a warning says how "
        "many)."
    )


def _check_seen(who: str, seen: int, skipped: list[int]) -> None:
    if seen == 0 and not skipped:
        raise ValueError(f"{who}: `batches` yielded no batch.")
    if seen == 0:
        raise ValueError(
            f"{who}: every batch ({len(skipped)}) gave non-finite BatchNorm moments; "
            "there is nothing to recompute the statistics from."
        )
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"{who}: skipped {len(skipped)} of {seen + len(skipped)} batches whose BatchNorm "
            f"moments were not finite (batches {shown}); the statistics come from the "
            f"other {seen}, and num_batches_tracked counts those.",
            RuntimeWarning,
            stacklevel=3,
        )


# --- helpers of the functional update_bn.


def _no_stats_message(who: str, tree: Any) -> str:
    return (
        f"{who}: batch_stats has no BatchNorm statistics (a mapping with exactly the keys "
        f"running_mean, running_var, num_batches_tracked); got structure "
        f"{jax.tree_util.tree_structure(tree)}."
    )


def _reset(batch_stats: Any, *, var: float) -> Any:
    """A copy of the tree with every BatchNorm's statistics reset (as PyTorch does)."""
    targets = stats_at(batch_stats)
    if not targets:
        raise ValueError(_no_stats_message("update_bn", batch_stats))
    reset = {
        path: dict(
            node,
            running_mean=jnp.zeros_like(node["running_mean"]),
            running_var=jnp.full_like(node["running_var"], var),
            num_batches_tracked=jnp.zeros_like(node["num_batches_tracked"]),
        )
        for path, node in targets.items()
    }
    return replace(batch_stats, reset)


def _check_cumulative(step: Callable[..., Any], params: Any, batch: Any, fresh: Any) -> None:
    """From `num_batches_tracked = 0`, momentum=None gives weight 1 to the batch, so the
    result cannot depend on the statistics it starts from; any other momentum does."""
    other = replace(
        fresh,
        {
            path: dict(
                node, running_mean=node["running_mean"] + 1, running_var=node["running_var"] + 1
            )
            for path, node in stats_at(fresh).items()
        },
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
