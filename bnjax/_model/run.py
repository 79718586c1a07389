"""Running a whole model of any kind, with a record of every BatchNorm call.

Three kinds of model, one way to run each (`run`):

- linen: a `flax.linen.Module` and its variables; `module.apply(variables, *args,
  mutable=["batch_stats", bnjax.linen.REPORTS], **kwargs)`;
- nnx: a `flax.nnx.Module`; `nnx.capture(model, bnjax.nnx.Reports)(*args, **kwargs)`;
- functional: `apply_fn(params, batch_stats, *args, bn, **kwargs) -> (outputs,
  new_batch_stats)`, the one signature of a functional model across bnjax's tools.
  `bn` has `bnjax.apply`'s signature; the tools hand the model `reporting_bn`, which
  normalizes exactly as `bnjax.apply` and returns the call's `BatchNormReport` in place
  of the new statistics (a model of `bnjax.batch_norm` layers may return each layer's
  `layer.report(moments)` there itself).

Every per-layer fact a tool needs (a BatchNorm's batch moments, its whole
`BatchNormConfig`, whether it trained) comes through the layer's `BatchNormReport`;
`ModelRun.reports` holds them at the paths of the layers' statistics (see `tree`).
Flax is imported only when a Flax model is given.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, NamedTuple

import jax

from bnjax._core.config import BatchNormConfig
from bnjax._core.layer import layer_from_config
from bnjax._core.report import BatchNormReport, collect_reports
from bnjax._model.tree import KeyPath, path_name, reports_at, stats_at


class ModelRun(NamedTuple):
    """One forward of a whole model and what its BatchNorms reported.

    Attributes:
      outputs: the model's outputs.
      reports: the reports tree, aligned with `batch_stats`: a `BatchNormReport` where
        the statistics hold a BatchNorm's dict (`tree.reports_at` lists them by path);
        a layer called several times has its calls stacked on a leading axis. A tree,
        not a dict keyed by paths, so that it crosses `jit` and `eval_shape`.
      batch_stats: the statistics after the call (linen: the `batch_stats`
        collection; functional: what `apply_fn` returned, reports in place of the
        statistics of layers run through `reporting_bn`; nnx: None, the model holds
        them).
    """

    outputs: Any
    reports: dict[KeyPath, BatchNormReport]
    batch_stats: Any


def model_kind(model: Any, who: str) -> str:
    """'linen', 'nnx' or 'functional', without importing flax when it is not loaded.

    Example:
      >>> model_kind(lambda p, s, x, bn: (x, s), "example")
      'functional'
    """
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(model, linen.Module):
        return "linen"
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    if not callable(model):
        raise TypeError(
            f"{who}: the model must be a flax.linen.Module, a flax.nnx.Module or a "
            f"function, got {type(model).__name__}."
        )
    return "functional"


def run_linen(module: Any, variables: Any, args: Any, kwargs: Any) -> ModelRun:
    """Runs a linen module with its reports collected.

    `batch_stats` is mutable too, so that a training-mode call runs; the new statistics
    are returned, not written anywhere.
    """
    from bnjax._flax.linen import REPORTS

    mutable = ["batch_stats", REPORTS]
    out, updates = module.apply(variables, *args, mutable=mutable, **kwargs)
    reports = collect_reports(updates.get(REPORTS, {}))
    return ModelRun(out, reports, updates.get("batch_stats", {}))


def run_nnx(model: Any, args: Any, kwargs: Any) -> ModelRun:
    """Calls an nnx module with its reports captured (the module updates itself)."""
    from flax import nnx

    from bnjax._flax.nnx import Reports

    out, reports = nnx.capture(model, Reports)(*args, **kwargs)
    return ModelRun(out, collect_reports(nnx.to_pure_dict(reports)), None)


def run_functional(
    apply_fn: Any, params: Any, batch_stats: Any, args: Any, kwargs: Any, bn: Any, who: str
) -> ModelRun:
    """Runs `apply_fn(params, batch_stats, *args, bn, **kwargs) -> (outputs, new_stats)`.

    A model written for an older bnjax that returns only the new statistics still runs,
    with a `DeprecationWarning` (that form goes in the next release).
    """
    result = apply_fn(params, batch_stats, *args, bn, **kwargs)
    if isinstance(result, tuple) and len(result) == 2 and _holds_stats(result[1], batch_stats):
        out, new = result
    elif _holds_stats(result, batch_stats):
        warnings.warn(
            f"{who}: apply_fn returned only the new batch_stats; return "
            "(outputs, new_batch_stats), the one signature of a functional model "
            "(`apply_fn(params, batch_stats, *args, bn)`). The old form goes in the next "
            "release.",
            DeprecationWarning,
            stacklevel=4,
        )
        out, new = None, result
    else:
        raise ValueError(
            f"{who}: apply_fn(params, batch_stats, *args, bn) must return "
            f"(outputs, new_batch_stats), got {type(result).__name__}."
        )
    return ModelRun(out, new, new)


def _holds_stats(new: Any, batch_stats: Any) -> bool:
    """Whether `new` can be what a model returns for `batch_stats`: reports or statistics."""
    if not stats_at(batch_stats):
        return isinstance(new, type(batch_stats)) or new is None
    return bool(reports_at(new) or stats_at(new))


def run(model: Any, *args: Any, who: str, bn: Any = None, **kwargs: Any) -> ModelRun:
    """Runs a model of any kind once (see the module docstring for the three calls).

    Args:
      model: a linen module, an nnx module or a functional `apply_fn`.
      *args: linen: `variables, *inputs`; nnx: `*inputs`; functional: `params,
        batch_stats, *inputs`.
      who: the tool's name, for errors.
      bn: functional only: the `bn` handed to the model (default `reporting_bn`).
      **kwargs: the model's keyword arguments.

    Returns:
      A `ModelRun`.

    Example:
      >>> def apply_fn(params, stats, x, bn):
      ...     y, new = bn(params["bn"], stats["bn"], x, True, eps=1e-3)
      ...     return y, {"bn": new}
      >>> p, s = bnjax.init(2)
      >>> ran = run(apply_fn, {"bn": p}, {"bn": s}, jnp.ones((4, 2)), who="example")
      >>> ran.reports["bn"].config.eps, ran.outputs.shape
      (0.001, (4, 2))
    """
    kind = model_kind(model, who)
    if kind == "linen":
        return run_linen(model, args[0], args[1:], kwargs)
    if kind == "nnx":
        return run_nnx(model, args, kwargs)
    bn = reporting_bn if bn is None else bn
    return run_functional(model, args[0], args[1], args[2:], kwargs, bn, who)


def reporting_bn(
    params: Any, batch_stats: Any, x: Any, train: bool, *, mask: Any = None, **settings: Any
) -> tuple[jax.Array, Any]:
    """`bnjax.apply` that returns its call's `BatchNormReport` in place of new statistics.

    `settings` are `bnjax.apply`'s keyword arguments, which are `BatchNormConfig`'s
    fields (momentum, eps, axis, axis_name, axis_index_groups, renorm,
    virtual_batch_size, ...), so every option of the core reaches the tools.

    Example:
      >>> p, s = bnjax.init(2)
      >>> y, report = reporting_bn(p, s, jnp.ones((4, 2)), True, virtual_batch_size=2)
      >>> report.config.virtual_batch_size, report.mean.shape
      (2, (2,))
    """
    config = BatchNormConfig(affine="weight" in params, bias="bias" in params, **settings)
    layer = layer_from_config(config)
    y, moments = layer.normalize(params, batch_stats, x, train, mask=mask)
    if not batch_stats:  # track_running_stats=False: nothing to recompute
        return y, batch_stats
    return y, layer.report(moments if train else None)


def missing_reports_message(who: str, missing: list[KeyPath], kind: str) -> str:
    """The error for BatchNorms that have statistics but reported nothing, with the fix."""
    if kind == "functional":
        where = ", ".join("".join(f"[{k!r}]" for k in p) for p in missing)
        return (
            f"{who}: the BatchNorm at {where} was never run through `bn`; apply_fn must "
            "call the `bn` it is given (not bnjax.apply) for every BatchNorm, with its "
            "statistics entry, and return what `bn` returns at that entry's place."
        )
    where = ", ".join(path_name(p) for p in missing)
    fix = {
        "linen": (
            "Under nn.scan / nn.vmap list the reports collection with the statistics, "
            "e.g. variable_axes={'params': 0, 'batch_stats': 0, bnjax.linen.REPORTS: 0}; "
            "a BatchNorm that is not a bnjax.linen.BatchNorm cannot report."
        ),
        "nnx": "Use bnjax.nnx.BatchNorm for every BatchNorm.",
    }[kind]
    return (
        f"{who}: the BatchNorm(s) at {where} reported nothing in the model's forward, so "
        f"their statistics cannot be recomputed. {fix}"
    )
