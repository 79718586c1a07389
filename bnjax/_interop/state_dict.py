"""The implementation behind `bnjax.interop` (its docstring is the guide).

PyTorch `state_dict` <-> Flax variables and bnjax trees, in NumPy, without torch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

import numpy as np

from bnjax._core.conventions import STAT_KEYS
from bnjax._core.deprecation import face_getattr
from bnjax._interop.pairing import LayerMatch as LayerMatch
from bnjax._interop.pairing import Matching as Matching
from bnjax._interop.pairing import to_numpy as _to_numpy
from bnjax._interop.port import flax_template as flax_template
from bnjax._interop.port import from_torch as from_torch
from bnjax._interop.port import match_layers as match_layers
from bnjax._interop.port import to_torch as to_torch

__all__ = [
    "LayerMatch",
    "Matching",
    "flax_template",
    "from_torch",
    "from_torch_state_dict",
    "match_layers",
    "to_torch",
    "to_torch_state_dict",
]

#: Leaf names that go to `batch_stats`; every other leaf goes to `params`.
deprecated_names = face_getattr("bnjax.interop", {"STAT_NAMES": ("bnjax.STAT_KEYS", STAT_KEYS)})

ConvLayout = Literal["HWIO", "OIHW"]
LinearLayout = Literal["in_out", "out_in"]
Tree = dict[str, Any]

_INT32_MAX = np.iinfo(np.int32).max
#: Leaf names only Flax uses: a tree holding them is a Flax model's, not torch-named.
_FLAX_LEAVES = ("kernel", "scale", "embedding")


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    *,
    conv_layout: ConvLayout = "HWIO",
    linear_layout: LinearLayout = "in_out",
    keep_torch_layout: Collection[str] = (),
    expected: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> tuple[Tree, Tree]:
    """Splits a PyTorch `state_dict` into nested `(params, batch_stats)` NumPy trees.

    Args:
      state_dict: a flat mapping from torch's dotted keys to tensors or arrays
        (`torch.Tensor`, NumPy arrays, anything with `.numpy()` or `__array__`), e.g.
        `model.state_dict()` or a checkpoint loaded with `torch.load`.
      conv_layout: `"HWIO"` (default) moves a convolution kernel `(O, I, *K)` to
        `(*K, I, O)`; `"OIHW"` keeps torch's layout.
      linear_layout: `"in_out"` (default) transposes a Linear's `(out, in)` weight to
        `(in, out)`; `"out_in"` keeps torch's layout.
      keep_torch_layout: module paths (e.g. `"embed"`, `"decoder.up1"`) whose `weight`
        keeps torch's layout whatever its number of dimensions.
      expected: optional `(params, batch_stats)` template trees (e.g. from a JAX
        model's init); the result must have exactly their keys and shapes.

    Returns:
      `(params, batch_stats)`: nested dicts of NumPy arrays keyed by module path
      (see the module docstring for what goes where).

    Raises:
      TypeError: a key is not a string, or a value cannot be turned into an array.
      ValueError: malformed keys, a module with `running_mean` but no `running_var`
        (or the reverse), a bad `num_batches_tracked`, or, with `expected`, missing,
        extra or mis-shaped keys (all of them listed).

    Example:
      >>> sd = {"bn.weight": np.ones(3, np.float32), "bn.bias": np.zeros(3, np.float32),
      ...       "bn.running_mean": np.zeros(3, np.float32),
      ...       "bn.running_var": np.ones(3, np.float32),
      ...       "bn.num_batches_tracked": np.array(0, np.int64)}
      >>> params, batch_stats = from_torch_state_dict(sd)
      >>> sorted(params["bn"]), batch_stats["bn"]["num_batches_tracked"].dtype
      (['bias', 'weight'], dtype('int32'))
    """
    _check_layouts(conv_layout, linear_layout)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "from_torch_state_dict: expected a mapping from torch's dotted keys to "
            f"tensors (e.g. model.state_dict()), got {type(state_dict).__name__}."
        )
    keep = _module_paths(keep_torch_layout, "keep_torch_layout")
    flat_params: dict[str, np.ndarray] = {}
    flat_stats: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        module, leaf = _split_key(key)
        arr = _to_numpy(value, key)
        if leaf in STAT_KEYS:
            if leaf == "num_batches_tracked":
                arr = _count_to_int32(arr, key)
            flat_stats[key] = arr
        else:
            if leaf == "weight" and module not in keep:
                arr = _weight_to_jax(arr, conv_layout, linear_layout)
            flat_params[key] = arr
    _check_stat_modules(flat_stats)
    params, batch_stats = _unflatten(flat_params), _unflatten(flat_stats)
    if expected is not None:
        exp_params, exp_stats = expected
        _check_against(
            {
                **_flatten(exp_params, "expected params"),
                **_flatten(exp_stats, "expected batch_stats"),
            },
            {**flat_params, **flat_stats},
            what="state_dict (converted)",
            reference="expected",
        )
    return params, batch_stats


def to_torch_state_dict(
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    *,
    conv_layout: ConvLayout = "HWIO",
    linear_layout: LinearLayout = "in_out",
    keep_torch_layout: Collection[str] = (),
    reference: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Flattens `(params, batch_stats)` back into a PyTorch `state_dict` of NumPy arrays.

    The exact inverse of `from_torch_state_dict` with the same layout options: torch's
    key names, layouts and dtypes (`num_batches_tracked` as int64). Load the result
    with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.

    Args:
      params: nested dicts of arrays (NumPy or JAX) keyed by module path.
      batch_stats: nested dicts of running statistics keyed by module path.
      conv_layout: the layout convolution kernels are in (`"HWIO"` or `"OIHW"`).
      linear_layout: the layout Linear weights are in (`"in_out"` or `"out_in"`).
      keep_torch_layout: module paths whose `weight` is already in torch's layout.
      reference: optional torch `state_dict` (e.g. `model.state_dict()`); the result
        must have exactly its keys and shapes and comes out in its key order.

    Returns:
      A flat `dict` from dotted torch keys to fresh NumPy arrays.

    Raises:
      ValueError: Flax leaf names (`kernel`, `scale`, `embedding`: use `to_torch`),
        a key appears in both trees, a key that is both a module and a leaf,
        a bad `num_batches_tracked`, or, with `reference`, missing, extra or
        mis-shaped keys (all of them listed).

    Example:
      >>> params = {"fc": {"weight": np.zeros((3, 2), np.float32)}}
      >>> to_torch_state_dict(params, {})["fc.weight"].shape
      (2, 3)
    """
    _check_layouts(conv_layout, linear_layout)
    keep = _module_paths(keep_torch_layout, "keep_torch_layout")
    flat_params = _flatten(params, "params")
    flat_stats = _flatten(batch_stats, "batch_stats")
    _reject_flax_names({**flat_params, **flat_stats})
    both = sorted(set(flat_params) & set(flat_stats))
    if both:
        raise ValueError(f"to_torch_state_dict: keys in both params and batch_stats: {both}.")
    out: dict[str, np.ndarray] = {}
    for key in _merged_order(params, batch_stats):
        module, leaf = _split_key(key)
        if key in flat_stats:
            arr = _to_numpy(flat_stats[key], key)
            if leaf == "num_batches_tracked":
                arr = _count_to_int64(arr, key)
        else:
            arr = _to_numpy(flat_params[key], key)
            if leaf == "weight" and module not in keep:
                arr = _weight_to_torch(arr, conv_layout, linear_layout)
        out[key] = arr
    if reference is not None:
        _check_against(reference, out, what="state_dict", reference="reference")
        out = {k: out[k] for k in reference}
    return out


# --------------------------------------------------------------------------- layouts


def _check_layouts(conv_layout: str, linear_layout: str) -> None:
    if conv_layout not in ("HWIO", "OIHW"):
        raise ValueError(f"conv_layout must be 'HWIO' or 'OIHW', got {conv_layout!r}.")
    if linear_layout not in ("in_out", "out_in"):
        raise ValueError(f"linear_layout must be 'in_out' or 'out_in', got {linear_layout!r}.")


def _weight_to_jax(w: np.ndarray, conv_layout: str, linear_layout: str) -> np.ndarray:
    if w.ndim == 2 and linear_layout == "in_out":
        return np.ascontiguousarray(w.T)
    if w.ndim >= 3 and conv_layout == "HWIO":
        # (O, I, *K) -> (*K, I, O)
        return np.ascontiguousarray(np.transpose(w, (*range(2, w.ndim), 1, 0)))
    return w


def _weight_to_torch(w: np.ndarray, conv_layout: str, linear_layout: str) -> np.ndarray:
    if w.ndim == 2 and linear_layout == "in_out":
        return np.ascontiguousarray(w.T)
    if w.ndim >= 3 and conv_layout == "HWIO":
        # (*K, I, O) -> (O, I, *K)
        return np.ascontiguousarray(np.transpose(w, (w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))))
    return w


# --------------------------------------------------------------------------- arrays


def _shape_source(v: Any) -> Any:
    """Something `np.shape` understands, without copying a tensor's data."""
    shape = getattr(v, "shape", None)
    return np.empty(tuple(shape), np.bool_) if shape is not None else v


def _count_to_int32(arr: np.ndarray, key: str) -> np.ndarray:
    _check_count(arr, key)
    if int(arr) > _INT32_MAX:
        raise ValueError(
            f"state_dict['{key}'] = {int(arr)} does not fit bnjax's int32 "
            f"num_batches_tracked (max {_INT32_MAX})."
        )
    return np.asarray(arr, np.int32)


def _count_to_int64(arr: np.ndarray, key: str) -> np.ndarray:
    _check_count(arr, key)
    return np.asarray(arr, np.int64)


def _check_count(arr: np.ndarray, key: str) -> None:
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 0:
        raise ValueError(
            f"'{key}' must be a non-negative integer scalar, got shape {arr.shape} and "
            f"dtype {arr.dtype}."
        )


# --------------------------------------------------------------------------- keys and trees


def _split_key(key: Any) -> tuple[str, str]:
    """`"a.b.weight"` -> `("a.b", "weight")`."""
    if not isinstance(key, str):
        raise TypeError(f"state_dict keys must be strings, got {key!r}.")
    parts = key.split(".")
    if any(p == "" for p in parts):
        raise ValueError(f"malformed state_dict key {key!r} (empty path component).")
    return ".".join(parts[:-1]), parts[-1]


def _module_paths(paths: Collection[str], name: str) -> frozenset[str]:
    if isinstance(paths, str):
        raise TypeError(f"{name} must be a collection of module paths, got the string {paths!r}.")
    return frozenset(paths)


def _unflatten(flat: Mapping[str, np.ndarray]) -> Tree:
    tree: Tree = {}
    clashes = []
    for key, arr in flat.items():
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                clashes.append(f"{'.'.join(parts[: i + 1])} (a leaf) vs {key}")
                break
            node = child
        else:
            if parts[-1] in node:
                clashes.append(f"{key} (a leaf) vs {key}.* (a module)")
            else:
                node[parts[-1]] = arr
    if clashes:
        raise ValueError(f"state_dict keys that are both a module and a leaf: {clashes}.")
    return tree


def _flatten(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name} must be a nested mapping, got {type(tree).__name__}.")
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if not isinstance(k, str) or not k or "." in k:
                raise ValueError(f"{name}: bad key {k!r} under {prefix or '<root>'!r}.")
            path = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                walk(v, path)
            else:
                flat[path] = v

    walk(tree, "")
    return flat


def _reject_flax_names(flat: Mapping[str, Any]) -> None:
    """Flax's leaf names would come out as wrong torch keys (`conv1.kernel`, untransposed)."""
    flax = [k for k in flat if _split_key(k)[1] in _FLAX_LEAVES]
    if flax:
        raise ValueError(
            "to_torch_state_dict: these keys have Flax's names, not torch's: "
            f"{flax}. This function takes trees with torch's names (from "
            "`from_torch_state_dict`); for a Flax model's variables (kernel, scale, "
            "embedding, Conv_0...) use `bnjax.interop.to_torch(variables, "
            "reference=torch_model.state_dict())`."
        )


def _merged_order(params: Mapping[str, Any], stats: Mapping[str, Any]) -> list[str]:
    """Keys module by module: a module's params, then its stats (torch's order for BN)."""
    keys: list[str] = []

    def walk(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, prefix: str) -> None:
        names = _unique(list(a or {}) + list(b or {}))
        for n in names:
            path = f"{prefix}.{n}" if prefix else n
            va, vb = (a or {}).get(n), (b or {}).get(n)
            if isinstance(va, Mapping) or isinstance(vb, Mapping):
                walk(
                    va if isinstance(va, Mapping) else None,
                    vb if isinstance(vb, Mapping) else None,
                    path,
                )
            if (va is not None and not isinstance(va, Mapping)) or (
                vb is not None and not isinstance(vb, Mapping)
            ):
                keys.append(path)

    walk(params, stats, "")
    return keys


def _unique(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _check_stat_modules(flat_stats: Mapping[str, np.ndarray]) -> None:
    """Every module with running statistics has both `running_mean` and `running_var`."""
    by_module: dict[str, set[str]] = {}
    for key in flat_stats:
        module, leaf = _split_key(key)
        by_module.setdefault(module, set()).add(leaf)
    incomplete = {
        m or "<root>": sorted({"running_mean", "running_var"} - leaves)
        for m, leaves in by_module.items()
        if not {"running_mean", "running_var"} <= leaves
    }
    if incomplete:
        raise ValueError(
            "state_dict: modules with running statistics miss (module: missing leaves) "
            f"{incomplete}."
        )


def _check_against(
    ref: Mapping[str, Any], got: Mapping[str, Any], *, what: str, reference: str
) -> None:
    """Raises listing every missing, extra and mis-shaped key of `got` against `ref`."""
    missing = [k for k in ref if k not in got]
    extra = [k for k in got if k not in ref]
    shapes = {k: tuple(np.shape(_shape_source(v))) for k, v in ref.items()}
    bad = [
        f"{k}: {tuple(np.shape(got[k]))} vs {reference} {shapes[k]}"
        for k in ref
        if k in got and tuple(np.shape(got[k])) != shapes[k]
    ]
    if missing or extra or bad:
        lines = [f"{what} does not match {reference}:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if extra:
            lines.append(f"  extra keys: {extra}")
        if bad:
            lines.append(f"  mis-shaped keys: {bad}")
        raise ValueError("\n".join(lines))
