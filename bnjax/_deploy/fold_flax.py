"""Folding for Flax models: watching a linen or nnx model's calls, and the folded runs.

Private to `bnjax.deploy.fold` (`_fold_model.py`); imports flax, so it is imported
only when a Flax model is folded.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from bnjax._deploy.fold import copy_dicts
from bnjax._deploy.fold_model import (
    Call,
    FoldedLinen,
    FoldPair,
    KeyPath,
    check_same,
    folded_layer,
    match_pairs,
    node_at,
    remove_at,
)
from bnjax._flax import linen as bnlinen
from bnjax._flax import nnx as bnnnx
from bnjax._flax.glue import resolve_train
from bnjax._model.run import run_linen, run_nnx
from bnjax._model.tree import path_name as _name
from bnjax._model.tree import reports_at

# --- linen.


def fold_linen(module, variables, args, kwargs, pairs, check, rtol) -> FoldedLinen:
    """`bnjax.deploy.fold` for a linen module (see there); pairs found by interception."""
    who = "bnjax.deploy.fold"
    layers: list[Call] = []
    bns: list[Call] = []

    def watch(next_fun, a, kw, ctx):
        out = next_fun(*a, **kw)
        mod = ctx.module
        if ctx.method_name == "__call__":
            x = a[0] if a else next(iter(kw.values()), None)
            if isinstance(mod, (nn.Conv, nn.Dense)):
                ndim = np.ndim(meta.unbox(mod.get_variable("params", "kernel")))
                layers.append(Call(mod.path, mod, x, out, ndim))
            elif isinstance(mod, bnlinen.BatchNorm):
                bns.append(Call(mod.path, mod, x, out, 0))
        return out

    def run(v):
        with nn.intercept_methods(watch):
            return run_linen(module, v, args, kwargs).reports

    reports = reports_at(jax.eval_shape(run, variables))
    matched = match_pairs(layers, bns, reports, pairs, who)

    new = copy_dicts(meta.unbox(variables))
    params, stats = new.get("params", {}), new.get("batch_stats", {})
    done: list[FoldPair] = []
    add_bias: set[KeyPath] = set()
    for layer, bn, report in matched:
        if any(p.bn == bn.path for p in done):
            continue
        eps = report.config.eps
        lp = node_at(params, layer.path)
        lead = np.ndim(lp["kernel"]) - layer.kernel_ndim
        bn_params = node_at(params, bn.path, {})
        kernel, bias = folded_layer(
            lp["kernel"], lp.get("bias"), bn_params, node_at(stats, bn.path), eps, lead
        )
        lp["kernel"], lp["bias"] = kernel, bias
        if not layer.module.use_bias:
            add_bias.add(layer.path)
        remove_at(params, bn.path)
        remove_at(stats, bn.path)
        done.append(FoldPair(layer.path, bn.path, eps))
    folded_bns = frozenset(p.bn for p in done)

    def skip_folded(next_fun, a, kw, ctx):
        mod = ctx.module
        if ctx.method_name == "__call__" and mod.path in folded_bns:
            if isinstance(mod, bnlinen.BatchNorm):
                train = a[1] if len(a) > 1 else kw.get("train")
                if resolve_train(
                    who, train, kw.get("use_running_average"), mod.use_running_average
                ):
                    raise ValueError(
                        f"{who}: the BatchNorm at {_name(mod.path)} is folded; a folded "
                        "model runs in eval mode only (train=False)."
                    )
                x = jnp.asarray(a[0] if a else kw["x"])
                return x if mod.dtype is None else x.astype(mod.dtype)
        out = next_fun(*a, **kw)
        if ctx.method_name == "__call__" and mod.path in add_bias:
            out = out + mod.get_variable("params", "bias").astype(out.dtype)
        return out

    def apply(variables: Any, *a: Any, **kw: Any) -> Any:
        with nn.intercept_methods(skip_folded):
            return module.apply(variables, *a, **kw)

    result = FoldedLinen(new, apply, tuple(done))
    if check and done:
        with jax.default_matmul_precision("highest"):
            ref = module.apply(variables, *args, **kwargs)
            got = apply(new, *args, **kwargs)
        check_same(ref, got, rtol, who, done)
    return result


# --- nnx.


def fold_nnx(model, args, kwargs, pairs, check, rtol):
    """`bnjax.deploy.fold` for an nnx module: a folded copy; pairs found by probes."""
    who = "bnjax.deploy.fold"
    graphdef, state = nnx.split(model)
    layers: list[Call] = []
    bns: list[Call] = []

    def run_reports(state):
        m = nnx.merge(graphdef, state)
        m.eval()
        return run_nnx(m, args, kwargs).reports

    reports = reports_at(jax.eval_shape(run_reports, state))

    def run(state):
        m = nnx.merge(graphdef, state)
        m.eval()
        targets = [
            (path, node)
            for path, node in nnx.iter_graph(m)
            if isinstance(node, (nnx.Conv, nnx.Linear, bnnnx.BatchNorm)) and path
        ]
        for path, node in targets:
            _set_child(m, path, _Probe(node, tuple(path), layers, bns))
        m(*args, **kwargs)

    jax.eval_shape(run, state)
    matched = match_pairs(layers, bns, reports, pairs, who)

    folded = nnx.clone(model)  # an independent copy: `model` is not changed
    done: list[FoldPair] = []
    for layer, bn, report in matched:
        if any(p.bn == bn.path for p in done):
            continue
        lay, b = _get_child(folded, layer.path), _get_child(folded, bn.path)
        eps = report.config.eps
        bn_params = {} if b.weight is None else {"weight": b.weight[...], "bias": b.bias[...]}
        bn_stats = {
            "running_mean": b.running_mean[...],
            "running_var": b.running_var[...],
            "num_batches_tracked": b.num_batches_tracked[...],
        }
        bias = None if lay.bias is None else lay.bias[...]
        lead = np.ndim(lay.kernel[...]) - layer.kernel_ndim  # stacked layers (nnx.vmap)
        kernel, bias = folded_layer(lay.kernel[...], bias, bn_params, bn_stats, eps, lead)
        lay.kernel[...] = kernel
        if lay.bias is None:
            lay.bias = nnx.Param(bias)
            lay.use_bias = True
        else:
            lay.bias[...] = bias
        _set_child(folded, bn.path, _Identity(b.dtype))
        done.append(FoldPair(layer.path, bn.path, eps))
    folded.eval()
    if check and done:
        original = nnx.clone(model)
        original.eval()
        with jax.default_matmul_precision("highest"):
            ref, got = original(*args, **kwargs), folded(*args, **kwargs)
        check_same(ref, got, rtol, who, done)
    return folded


def _get_child(root: Any, path: KeyPath) -> Any:
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set_child(root: Any, path: KeyPath, value: Any) -> None:
    parent = _get_child(root, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


class _Probe(nnx.Module):
    """Wraps a Conv, Linear or BatchNorm of an abstract copy to record its call."""

    def __init__(self, inner: Any, path: KeyPath, layers: list[Call], bns: list[Call]):
        self.inner = inner
        self.path = path
        self.record = layers.append if not isinstance(inner, bnnnx.BatchNorm) else bns.append

    def __call__(self, *a: Any, **kw: Any) -> Any:
        y = self.inner(*a, **kw)
        x = a[0] if a else next(iter(kw.values()), None)
        ndim = 0 if isinstance(self.inner, bnnnx.BatchNorm) else np.ndim(self.inner.kernel[...])
        self.record(Call(self.path, self.inner, x, y, ndim))
        return y


class _Identity(nnx.Module):
    """Stands in for a folded BatchNorm in an nnx model: returns its input."""

    def __init__(self, dtype: Any):
        self.dtype = dtype

    def __call__(self, x: Any, *, train: bool | None = None, **unused: Any) -> Any:
        del unused
        if train:
            raise ValueError(
                "bnjax.deploy.fold: this BatchNorm is folded; a folded model runs in eval "
                "mode only (train=False)."
            )
        x = jnp.asarray(x)
        return x if self.dtype is None else x.astype(self.dtype)
