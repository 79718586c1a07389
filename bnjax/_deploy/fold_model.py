"""Folding the BatchNorms of a whole model (linen, nnx or functional) into their layers.

`fold(model, ...)` runs the model once abstractly (`jax.eval_shape`) on a sample
input, in eval mode, and watches every `flax` Conv / Dense and every bnjax BatchNorm
call: a BatchNorm whose input *is* (the same traced array as) a Conv's or Dense's
output is foldable into it. Each BatchNorm's `eps` is read from the layer itself.
The folded model is then run on the sample and compared with the original, so a
folded layer whose output also feeds something else (a residual add, a layer shared
between calls) is an error, not a silently different model.

What comes back runs without writing a second model:

- linen: `FoldedLinen(variables, apply, pairs)`; `apply` is the module's own
  `apply` with the folded BatchNorms skipped (`flax.linen.intercept_methods`), and a
  layer built with `use_bias=False` adds the folded bias it now needs.
- nnx: a folded copy of the module, in eval mode: kernels and biases folded (a
  layer without bias gets one), each folded BatchNorm replaced by an identity.
- functional: `FoldedFunctional(params, batch_stats, apply, pairs)`; `apply` runs the
  model with a `bn` that passes folded BatchNorms through.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._core import functional as _core
from bnjax._core.report import BatchNormReport
from bnjax._core.validate import normalize_axes
from bnjax._deploy.fold import as_path, bn_scale_shift, fold_batchnorms, fold_into_kernel
from bnjax._model.run import reporting_bn
from bnjax._model.tree import KeyPath
from bnjax._model.tree import path_name as _name


class FoldPair(NamedTuple):
    """One BatchNorm folded into the layer that feeds it."""

    layer: KeyPath  # the Conv / Dense: its module path (= its key path in `params`)
    bn: KeyPath  # the BatchNorm's module path (= its key path in `params`/`batch_stats`)
    eps: float  # that BatchNorm's own eps, read from the model


class FoldedLinen(NamedTuple):
    """A linen model with its BatchNorms folded: run `apply(variables, ...)` in eval mode."""

    variables: dict[str, Any]  # folded kernels/biases; folded BatchNorms' entries removed
    apply: Callable[..., Any]  # `module.apply` with the folded BatchNorms skipped
    pairs: tuple[FoldPair, ...]  # what was folded, in call order


class FoldedFunctional(NamedTuple):
    """A functional model with its BatchNorms folded: run `apply(params, batch_stats, ...)`."""

    params: dict[str, Any]  # folded kernels/biases; folded BatchNorms' params removed
    batch_stats: dict[str, Any]  # a `FoldedBatchNorm()` marker at each folded BatchNorm
    apply: Callable[..., Any]  # `apply(params, batch_stats, *args)`: the model's outputs
    pairs: tuple[FoldPair, ...]  # what was folded


class FoldedBatchNorm(NamedTuple):
    """Marks a folded BatchNorm in a functional model's `batch_stats` (no arrays)."""


# --- what one watched call saw.


class Call(NamedTuple):
    """One watched call of a layer or BatchNorm in the abstract sample run."""

    path: KeyPath
    module: Any
    x: Any  # the traced input
    y: Any  # the traced output
    kernel_ndim: int  # layers: the kernel's rank as the call saw it (unstacked)


def match_pairs(
    layers: list[Call],
    bns: list[Call],
    reports: Mapping[KeyPath, BatchNormReport],
    pairs: Any,
    who: str,
) -> list[tuple[Call, Call, BatchNormReport]]:
    """Pairs each BatchNorm call with the layer call whose output it normalizes.

    Everything about the BatchNorm (its eps, axis, mode, running statistics) is read
    from its `BatchNormReport`; the watched calls only say which array feeds which.
    """
    by_path = {_key(p): r for p, r in reports.items()}
    by_bn: dict[KeyPath, list[tuple[Call, Call | None]]] = {}
    for b in bns:
        src = next((lc for lc in layers if lc.y is b.x), None)
        by_bn.setdefault(b.path, []).append((b, src))
    found: dict[KeyPath, tuple[Call, Call, BatchNormReport] | str] = {}
    for path, calls in by_bn.items():
        b, src = calls[0]
        srcs = {None if s is None else s.path for _, s in calls}
        report = by_path.get(_key(path))
        shape = np.shape(b.x)
        if report is None:
            found[path] = (
                "it reported nothing (under nn.scan / nn.vmap, list bnjax.linen.REPORTS "
                "in variable_axes)"
            )
        elif src is None or len(srcs) != 1:
            found[path] = "its input is not exactly the output of a Conv or Dense"
        elif report.trained:
            found[path] = "it ran in training mode (pass the eval-mode arguments, e.g. train=False)"
        elif not report.config.track_running_stats:
            found[path] = "it has no running statistics (track_running_stats=False)"
        elif normalize_axes(report.config.axis, shape) != (len(shape) - 1,):
            found[path] = (
                f"it normalizes axis {report.config.axis}, not the layer's output channels"
            )
        elif sum(lc.path == src.path for lc in layers) != len(calls):
            found[path] = f"the layer {_name(src.path)} is also called elsewhere"
        else:
            found[path] = (src, b, report)
    if pairs is None:
        foldable = [v for v in found.values() if not isinstance(v, str)]
        why = "; ".join(f"{_name(k)}: {v}" for k, v in found.items() if isinstance(v, str))
        if not foldable:
            raise ValueError(
                f"{who}: found no Conv/Dense -> BatchNorm pair to fold in the sample call "
                f"({why or 'no bnjax BatchNorm ran'})."
            )
        if why:  # the model stays right (these BatchNorms still run), but say so
            warnings.warn(f"{who}: left these BatchNorms unfolded: {why}.", stacklevel=4)
        return foldable
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{who}: pairs[{i}] must be (layer_path, bn_path), got {pair!r}.")
        layer_path, bn_path = (as_path(p) for p in pair)
        hit = next((v for k, v in found.items() if _same_path(k, bn_path)), None)
        if hit is None:
            raise ValueError(
                f"{who}: pairs[{i}]: no bnjax BatchNorm at {_name(bn_path)} ran in the sample "
                f"call; BatchNorms that ran: {[_name(p) for p in found] or 'none'}."
            )
        if isinstance(hit, str):
            raise ValueError(f"{who}: pairs[{i}]: cannot fold {_name(bn_path)}: {hit}.")
        if not _same_path(hit[0].path, layer_path):
            raise ValueError(
                f"{who}: pairs[{i}]: {_name(bn_path)} is fed by {_name(hit[0].path)}, "
                f"not by {_name(layer_path)}."
            )
        out.append(hit)
    return out


def _key(path: KeyPath) -> tuple[str, ...]:
    """Paths compare as strings: `"blocks/0/bn"` names an nnx list's `("blocks", 0, "bn")`."""
    return tuple(map(str, path))


def _same_path(a: KeyPath, b: KeyPath) -> bool:
    return _key(a) == _key(b)


def folded_layer(kernel: Any, bias: Any, bn_params: Any, bn_stats: Any, eps: float, lead: int):
    """Folds one pair; `lead` leading axes are stacked copies (`nn.scan`), folded one by one."""

    def one(kernel, bias, bn_params, bn_stats):
        scale, shift = bn_scale_shift(bn_params, bn_stats, eps=eps)
        return fold_into_kernel(kernel, bias, scale, shift)

    for _ in range(lead):
        one = jax.vmap(one)
    return one(kernel, bias, bn_params, bn_stats)


def check_same(ref: Any, got: Any, rtol: float, who: str, pairs: Sequence[FoldPair]) -> None:
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
    got_leaves = jax.tree_util.tree_leaves(got)
    for (path, r), g in zip(ref_leaves, got_leaves, strict=True):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        scale = max(1.0, float(np.max(np.abs(r64), initial=0.0)))
        err = float(np.max(np.abs(g64 - r64), initial=0.0))
        if not err <= rtol * scale:
            raise ValueError(
                f"{who}: the folded model's output {jax.tree_util.keystr(path) or '<root>'} "
                f"differs from the original's by {err:.3g} (scale {scale:.3g}), so folding "
                f"{[(_name(p.layer), _name(p.bn)) for p in pairs]} changes the model: a folded "
                "layer's output probably also feeds something else (a residual add, or a "
                "layer called twice). Pass pairs=[...] with the pairs that are safe."
            )


def node_at(tree: Any, path: KeyPath, default: Any = None) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            if default is not None:
                return default
            raise KeyError(f"bnjax.deploy.fold: no variables at {_name(path)}.")
        node = node[key]
    return node


def remove_at(tree: dict[str, Any], path: KeyPath) -> None:
    node = tree
    for key in path[:-1]:
        if key not in node:
            return
        node = node[key]
    node.pop(path[-1], None)


# --- functional.


def _folded_bn(params, batch_stats, x, train, **config):
    if isinstance(batch_stats, FoldedBatchNorm):
        if train:
            raise ValueError(
                "bnjax.deploy.fold: a folded BatchNorm was called with train=True; a folded "
                "model runs in eval mode only."
            )
        return jnp.asarray(x), batch_stats
    return _core.apply(params, batch_stats, x, train, **config)


def fold_functional(apply_fn, params, batch_stats, args, kwargs, pairs, check, rtol):
    who = "bnjax.deploy.fold"
    if pairs is None:
        raise ValueError(
            f"{who}: a functional model's layers cannot be watched, so list what to fold: "
            "pairs=[(layer_path, bn_path), ...]."
        )
    seen = jax.eval_shape(
        lambda p, s: apply_fn(p, s, *args, reporting_bn, **kwargs), params, batch_stats
    )
    if not (isinstance(seen, tuple) and len(seen) == 2):
        raise ValueError(
            f"{who}: apply_fn(params, batch_stats, *args, bn) must return "
            f"(outputs, new_batch_stats), got {type(seen).__name__}."
        )
    done: list[FoldPair] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{who}: pairs[{i}] must be (layer_path, bn_path), got {pair!r}.")
        layer_path, bn_path = (as_path(p) for p in pair)
        got = node_at(seen[1], bn_path, "missing")
        if not isinstance(got, BatchNormReport):
            raise ValueError(
                f"{who}: pairs[{i}]: apply_fn's new_batch_stats has no BatchNorm entry at "
                f"{_name(bn_path)}; call the `bn` it is given for every BatchNorm and return "
                "what `bn` returns as that BatchNorm's entry, at its place in batch_stats."
            )
        if got.trained:
            raise ValueError(
                f"{who}: the BatchNorm at {_name(bn_path)} ran with train=True; fold runs "
                "the eval-mode forward (train=False)."
            )
        done.append(FoldPair(layer_path, bn_path, got.config.eps))
    new_params, new_stats = fold_batchnorms(
        params, batch_stats, [(p.layer, p.bn, p.eps) for p in done]
    )
    for p in done:
        _put(new_params, p.bn, {})
        _put(new_stats, p.bn, FoldedBatchNorm())

    def apply(params: Any, batch_stats: Any, *a: Any, **kw: Any) -> Any:
        return apply_fn(params, batch_stats, *a, _folded_bn, **kw)

    if check and done:
        with jax.default_matmul_precision("highest"):
            ref = apply_fn(params, batch_stats, *args, _core.apply, **kwargs)[0]
            out = apply(new_params, new_stats, *args, **kwargs)[0]
        check_same(ref, out, rtol, who, done)
    return FoldedFunctional(new_params, new_stats, apply, tuple(done))


def _put(tree: dict[str, Any], path: KeyPath, value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
