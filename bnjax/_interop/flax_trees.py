"""The implementation behind `bnjax.flax_interop` (its docstring is the guide).

Converting `flax.linen.BatchNorm` variables to bnjax's trees and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from bnjax._core.conventions import STAT_KEYS, momentum_from_flax, momentum_to_flax
from bnjax._core.deprecation import face_getattr

__all__ = [
    "from_flax",
    "to_flax",
    "variables_from_flax",
    "variables_to_flax",
]

Tree = dict[str, Any]

_FLAX_STATS = ("mean", "var")
_BNJAX_STATS = STAT_KEYS


def from_flax(
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    *,
    n: int | None = None,
    num_batches_tracked: int = 0,
) -> tuple[Tree, Tree]:
    """Converts one `flax.linen.BatchNorm`'s variables to bnjax's `(params, batch_stats)`.

    `var` is Flax's moving average of the *biased* batch variance; it is copied as is,
    or multiplied by `n / (n - 1)` when `n` is given (see the module docstring for
    the exact relation).

    Args:
      params: the layer's `params`, `{"scale", "bias"}`. `use_bias=False` (`{"scale"}`)
        gives `{"weight"}` alone (PyTorch's `bias=False`); `use_scale=False`
        (`{"bias"}`) gets `weight = 1`, which computes the same numbers (bnjax has no
        bias-only BatchNorm); neither gives `{}`.
      batch_stats: the layer's `batch_stats`, `{"mean", "var"}`.
      n: the number of values per feature in each training batch (batch size times
        spatial size); `None` copies the variance unchanged.
      num_batches_tracked: the value to store (Flax does not count batches); it only
        matters for `momentum=None` (cumulative average).

    Returns:
      `(params, batch_stats)` with bnjax's (PyTorch's) names:
      `{"weight", "bias"}` (or `{"weight"}`) and
      `{"running_mean", "running_var", "num_batches_tracked"}`.

    Raises:
      ValueError: missing or unexpected keys, or `n < 2`.

    Example:
      >>> p, s = from_flax({"scale": jnp.ones(3), "bias": jnp.zeros(3)},
      ...                  {"mean": jnp.zeros(3), "var": jnp.ones(3)}, n=4)
      >>> s["running_var"]
      Array([1.3333334, 1.3333334, 1.3333334], dtype=float32)
    """
    _check_keys("flax params", params, ("scale", "bias"), allow_subset=True)
    _check_keys("flax batch_stats", batch_stats, _FLAX_STATS)
    mean = jnp.asarray(batch_stats["mean"])
    var = _rescale(jnp.asarray(batch_stats["var"]), n, up=True)
    new_params: Tree = {}
    if params:
        scale = params.get("scale")
        bias = params.get("bias")
        if bias is None:  # use_bias=False: PyTorch's bias=False, weight alone
            new_params = {"weight": jnp.asarray(scale)}
        else:
            new_params = {
                "weight": jnp.asarray(scale) if scale is not None else jnp.ones_like(bias),
                "bias": jnp.asarray(bias),
            }
    new_stats = {
        "running_mean": mean,
        "running_var": var,
        "num_batches_tracked": jnp.asarray(num_batches_tracked, jnp.int32),
    }
    return new_params, new_stats


def to_flax(
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    *,
    n: int | None = None,
) -> tuple[Tree, Tree]:
    """Converts bnjax's `(params, batch_stats)` to a `flax.linen.BatchNorm`'s variables.

    Args:
      params: `{"weight", "bias"}`, `{"weight"}` (Flax's `use_bias=False`) or `{}`
        (affine=False: Flax's `use_scale=False, use_bias=False`).
      batch_stats: `{"running_mean", "running_var", "num_batches_tracked"}`. bnjax
        without tracked statistics has no Flax equivalent.
      n: the number of values per feature in each batch; when given, the unbiased
        `running_var` is multiplied by `(n - 1) / n`; `None` copies it unchanged.

    Returns:
      `(params, batch_stats)` with Flax's names, `{"scale", "bias"}` (or `{"scale"}`) and
      `{"mean", "var"}`. `num_batches_tracked` is dropped (Flax has none).

    Raises:
      ValueError: missing or unexpected keys, or `n < 2`.

    Example:
      >>> p, s = bnjax.init(3)
      >>> fp, fs = to_flax(p, s)
      >>> sorted(fp), sorted(fs)
      (['bias', 'scale'], ['mean', 'var'])
    """
    if set(params) != {"weight"}:  # {"weight"} alone: PyTorch's bias=False
        _check_keys("bnjax params", params, ("weight", "bias"), allow_empty=True)
    _check_keys("bnjax batch_stats", batch_stats, _BNJAX_STATS)
    new_params: Tree = {}
    if params:
        new_params = {"scale": jnp.asarray(params["weight"])}
        if "bias" in params:
            new_params["bias"] = jnp.asarray(params["bias"])
    new_stats = {
        "mean": jnp.asarray(batch_stats["running_mean"]),
        "var": _rescale(jnp.asarray(batch_stats["running_var"]), n, up=False),
    }
    return new_params, new_stats


def variables_from_flax(
    variables: Mapping[str, Any],
    *,
    n: int | Mapping[tuple[str, ...], int] | None = None,
    num_batches_tracked: int = 0,
) -> Tree:
    """Converts every `flax.linen.BatchNorm` in a model's variables to bnjax's names.

    A BatchNorm is found by its `batch_stats` entry holding exactly `{"mean", "var"}`;
    the `params` at the same path are renamed with it. Everything else (other
    layers, other collections) is copied unchanged, so a model that swaps
    `nn.BatchNorm` for `bnjax.linen.BatchNorm` under the same module names can load
    the result.

    Args:
      variables: `{"params": ..., "batch_stats": ..., ...}` as `model.init` returns.
      n: values per feature per batch, for all layers (an int) or per layer (a dict
        from the layer's path tuple, e.g. `("BatchNorm_0",)`, to an int); layers
        without one keep the variance unchanged. See `from_flax`.
      num_batches_tracked: the count stored in every layer.

    Returns:
      A new variables dict with bnjax's names in the BatchNorm layers.

    Raises:
      ValueError: `variables` has no `batch_stats` collection, or a bad `n`.

    Example:
      >>> import jax
      >>> import flax.linen as nn
      >>> bn = nn.BatchNorm(use_running_average=True)
      >>> flax_vars = bn.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> sorted(variables_from_flax(flax_vars)["batch_stats"])
      ['num_batches_tracked', 'running_mean', 'running_var']
    """
    return _convert_model(
        variables,
        _FLAX_STATS,
        lambda path, p, s: from_flax(
            p, s, n=_n_for(n, path), num_batches_tracked=num_batches_tracked
        ),
    )


def variables_to_flax(
    variables: Mapping[str, Any],
    *,
    n: int | Mapping[tuple[str, ...], int] | None = None,
) -> Tree:
    """Converts every bnjax BatchNorm in a model's variables to Flax's names.

    The inverse of `variables_from_flax` (up to `num_batches_tracked`, which Flax does
    not keep): a layer is found by its `batch_stats` entry holding exactly
    `{"running_mean", "running_var", "num_batches_tracked"}`.

    Args:
      variables: `{"params": ..., "batch_stats": ..., ...}`.
      n: as in `variables_from_flax`; rescales the variance by `(n - 1) / n`.

    Returns:
      A new variables dict with Flax's names in the BatchNorm layers.

    Raises:
      ValueError: `variables` has no `batch_stats` collection, or a bad `n`.

    Example:
      >>> params, batch_stats = bnjax.init(3)
      >>> v = variables_to_flax({"params": {"bn": params}, "batch_stats": {"bn": batch_stats}})
      >>> sorted(v["params"]["bn"]), sorted(v["batch_stats"]["bn"])
      (['bias', 'scale'], ['mean', 'var'])
    """
    return _convert_model(
        variables,
        _BNJAX_STATS,
        lambda path, p, s: to_flax(p, s, n=_n_for(n, path)),
    )


def _convert_model(variables: Mapping[str, Any], stat_keys: tuple[str, ...], convert) -> Tree:
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            "expected a model's variables with a 'batch_stats' collection (as `model.init` "
            f"returns), got {got}."
        )
    out = {k: _to_dict(v) for k, v in variables.items()}
    params = out.get("params", {})

    def walk(stats: Tree, path: tuple[str, ...]) -> None:
        for key, value in list(stats.items()):
            if not isinstance(value, dict):
                continue
            sub = path + (key,)
            if set(value) == set(stat_keys):
                layer_params = _get(params, sub)
                new_p, new_s = convert(sub, layer_params if layer_params is not None else {}, value)
                stats[key] = new_s
                if layer_params is not None:
                    _set(params, sub, new_p)
            else:
                walk(value, sub)

    if set(out["batch_stats"]) == set(stat_keys):  # a bare layer: the root is the BatchNorm
        p, s = convert((), params, out["batch_stats"])
        out["batch_stats"] = s
        if "params" in out:
            out["params"] = p
    else:
        walk(out["batch_stats"], ())
    return out


def _to_dict(tree: Any) -> Any:
    """A plain nested dict copy (FrozenDicts unfrozen); leaves are shared, not copied."""
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _get(tree: Tree, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: Tree, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _n_for(n: Any, path: tuple[str, ...]) -> int | None:
    if isinstance(n, Mapping):
        return n.get(path)
    return n


def _rescale(var: Any, n: int | None, *, up: bool) -> Any:
    if n is None:
        return var
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(
            f"n (values per feature per batch) must be an int >= 2 or None, got {n!r}."
        )
    factor = n / (n - 1) if up else (n - 1) / n
    dtype = jnp.promote_types(var.dtype, jnp.float32)
    return (var.astype(dtype) * factor).astype(var.dtype)


def _check_keys(
    name: str,
    tree: Any,
    expected: tuple[str, ...],
    *,
    allow_subset: bool = False,
    allow_empty: bool = False,
) -> None:
    if not isinstance(tree, Mapping):
        raise ValueError(f"{name} must be a dict with keys {list(expected)}, got {tree!r}.")
    keys = set(tree)
    extra = sorted(keys - set(expected), key=str)
    missing = sorted(set(expected) - keys)
    if (allow_empty and not keys) or (allow_subset and not extra):
        return
    if extra or missing:
        raise ValueError(
            f"{name} must have the keys {list(expected)}; missing keys: {missing}, "
            f"unexpected keys: {extra}."
        )


deprecated_names = face_getattr(
    "bnjax.flax_interop",
    {
        "momentum_from_flax": ("bnjax.momentum_from_flax", momentum_from_flax),
        "momentum_to_flax": ("bnjax.momentum_to_flax", momentum_to_flax),
    },
)
