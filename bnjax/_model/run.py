"""Whole-model plumbing shared by precise BN and folding: which kind of model, and its reports.

Every per-layer fact the deployment tools need (a BatchNorm's batch moments, its
`eps`, whether it ran in training mode) comes through the one channel,
`bnjax.BatchNormReport`:

- linen: `module.apply(..., mutable=[bnjax.linen.REPORTS, ...])`;
- nnx: `nnx.capture(model, bnjax.nnx.Reports)`;
- functional: the `bn` function the tool hands to `apply_fn` returns a report in
  place of the BatchNorm's new statistics.

`bnjax.collect_reports` aligns them with `batch_stats`: a report's path is its
BatchNorm's path. Flax is imported only when a Flax model is given.
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from bnjax._core.conventions import is_batch_stats as is_stats
from bnjax._core.report import BatchNormReport, collect_reports

KeyPath = tuple[Any, ...]


def model_kind(model: Any, who: str) -> str:
    """'linen', 'nnx' or 'functional', without importing flax when it is not loaded."""
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


def is_report(node: Any) -> bool:
    return isinstance(node, BatchNormReport)


def report_leaves(tree: Any) -> dict[KeyPath, BatchNormReport]:
    """`{path: report}` for every report in a tree (paths as tuples of plain keys)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_report)[0]
    return {plain_path(path): leaf for path, leaf in leaves if is_report(leaf)}


def stats_leaves(tree: Any) -> dict[KeyPath, Any]:
    """`{path: stats dict}` for every BatchNorm's running statistics in a tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_stats)[0]
    return {plain_path(path): leaf for path, leaf in leaves if is_stats(leaf)}


def plain_path(path: Any) -> KeyPath:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(k)
    return tuple(out)


def name(path: KeyPath) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def linen_reports(module: Any, variables: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Runs a linen module with its reports collected: `(outputs, reports tree)`.

    `batch_stats` is mutable too, so that a training-mode call runs; its updates are
    discarded.
    """
    from bnjax._flax.linen import REPORTS

    out, updates = module.apply(variables, *args, mutable=["batch_stats", REPORTS], **kwargs)
    return out, collect_reports(updates.get(REPORTS, {}))


def nnx_reports(model: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Calls an nnx module with its reports captured: `(outputs, reports tree)`."""
    from flax import nnx

    from bnjax._flax.nnx import Reports

    out, reports = nnx.capture(model, Reports)(*args, **kwargs)
    return out, collect_reports(nnx.to_pure_dict(reports))


def missing_reports_message(who: str, missing: list[KeyPath], kind: str) -> str:
    if kind == "functional":
        where = ", ".join("".join(f"[{k!r}]" for k in p) for p in missing)
        return (
            f"{who}: the BatchNorm at {where} was never run through `bn`; apply_fn must "
            "call the `bn` it is given (not bnjax.apply) for every BatchNorm, with its "
            "statistics entry, and return what `bn` returns at that entry's place."
        )
    where = ", ".join(name(p) for p in missing)
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
