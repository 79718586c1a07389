"""Whole-model conversion: a PyTorch `state_dict` <-> a Flax model's variables.

One concept: *layers*. A torch `state_dict` is grouped by module path (`layer1.0.conv1`)
into layers with torch leaf names (`weight`, `bias`, `running_mean`...); a Flax variables
tree (linen `{"params", "batch_stats"}`, an `nnx.State`, or a tuple of them) is grouped
by module path into layers with Flax leaf names (`kernel`, `scale`, `embedding`, or
bnjax's BatchNorm names). Layers are paired (by path, then by definition order within
a signature), and each pair converts leaf by leaf with the layout rule of its kind.
Public entry points are `bnjax.interop.from_torch`, `to_torch` and `match_layers`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from bnjax._core.conventions import STAT_KEYS
from bnjax._interop import kinds as K
from bnjax._interop import order as O

Match = Literal["auto", "path", "order"]
Rename = Mapping[str, str] | Callable[[str], str | None] | None

_STATS = STAT_KEYS
BN_LEAVES = ("weight", "bias", *_STATS)
_COLLECTIONS = ("params", "batch_stats")
_AUTO_NAME = re.compile(r"^[A-Z]\w*_\d+$")
_LAYERS_N = re.compile(r"^layers_(\d+)$")
_INT32_MAX = np.iinfo(np.int32).max

# --------------------------------------------------------------------------- records


class TorchLayer(NamedTuple):
    """One torch module's entries in a `state_dict`."""

    path: str  # torch module path, "layer1.0.conv1" ("" for a bare layer)
    leaves: dict[str, Any]  # torch leaf name -> array-like (torch layout), state_dict order
    transposed: bool  # known to be a ConvTranspose (from the module's class)


class FlaxLayer(NamedTuple):
    """One Flax module's variables, all collections together."""

    path: tuple[str, ...]  # module path without the collection, ("layer1", "0", "conv1")
    leaves: dict[str, tuple[tuple[Any, ...], Any]]  # Flax leaf -> (full key path, template)
    kind: str  # one of kinds.WEIGHT_NAME's keys


class LayerMatch(NamedTuple):
    """One torch module paired with one Flax module."""

    torch: str  # torch module path, "layer1.0.downsample.0"
    flax: str  # Flax module path, "layer1/0/downsample/0" or "BasicBlock_0/Conv_2"
    kind: str  # "conv", "conv_transpose", "dense", "embed", "norm" or "batchnorm"
    by: str  # "path" (default rule or rename), "order" (same kind and shapes) or "calls"


class Matching(NamedTuple):
    """What `bnjax.interop.match_layers` paired, and what it could not pair.

    `print(matching)` shows one line per pair. `unmatched_torch` / `unmatched_flax`
    are the module paths left over (an error in strict conversion).
    """

    pairs: tuple[LayerMatch, ...]  # in the template's definition order
    unmatched_torch: tuple[str, ...]  # torch module paths with no Flax layer
    unmatched_flax: tuple[str, ...]  # Flax module paths with no torch entries
    problem: str = ""  # why some order pairs cannot be trusted ("" when none)
    sorted_keys: bool = False  # the Flax variables' keys looked sorted where it mattered

    def __str__(self) -> str:
        width = max([len(p.torch) for p in self.pairs] + [5])
        lines = [f"Ambiguous: {self.problem}."] if self.problem else []
        lines += [f"{'torch':<{width}}  ->  flax  [kind, matched by]"]
        lines += [f"{p.torch:<{width}}  ->  {p.flax}  [{p.kind}, {p.by}]" for p in self.pairs]
        lines += [f"{t:<{width}}  ->  (no Flax layer)" for t in self.unmatched_torch]
        lines += [f"{'(no torch entries)':<{width}}  ->  {f}" for f in self.unmatched_flax]
        return "\n".join(lines)


# --------------------------------------------------------------------------- torch side


def torch_layers(source: Any, conv_transpose: Collection[str] = ()) -> list[TorchLayer]:
    """Groups a state_dict (or a torch module's) by module path, in its order."""
    transposed = set(conv_transpose)
    if hasattr(source, "state_dict") and hasattr(source, "named_modules"):
        for name, module in source.named_modules():
            if any("ConvTranspose" in c.__name__ for c in type(module).__mro__):
                transposed.add(name)
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(
            "expected a torch state_dict (a mapping from dotted keys to tensors or arrays, "
            f"e.g. `model.state_dict()`) or a torch module, got {type(source).__name__}."
        )
    layers: dict[str, dict[str, Any]] = {}
    for key, value in source.items():
        if not isinstance(key, str) or any(p == "" for p in key.split(".")):
            raise ValueError(f"malformed state_dict key {key!r}.")
        module, _, leaf = key.rpartition(".")
        layers.setdefault(module, {})[leaf] = value
    return [TorchLayer(p, leaves, p in transposed) for p, leaves in layers.items()]


def torch_key(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def leaf_shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", np.shape(value)))


def np_dtype(value: Any) -> np.dtype:
    """The NumPy dtype of an array or tensor (`torch.float32` -> `float32`)."""
    dtype = value.dtype
    if isinstance(dtype, np.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ndim(value: Any) -> int:
    return len(leaf_shape(value))


def to_numpy(value: Any, key: str) -> np.ndarray:
    """A fresh NumPy copy of a tensor/array, via `.detach().cpu().numpy()` when present."""
    v = value
    try:
        if hasattr(v, "detach"):
            v = v.detach()
        if hasattr(v, "cpu"):
            v = v.cpu()
        if str(getattr(v, "dtype", "")) == "torch.bfloat16":
            # NumPy has no bfloat16; reinterpret the bits (torch is already imported).
            import ml_dtypes

            torch = sys.modules["torch"]
            return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        if hasattr(v, "numpy") and not isinstance(v, np.ndarray | np.generic):
            v = v.numpy()
        arr = np.array(v, copy=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the key named
        raise TypeError(
            f"state_dict['{key}']: cannot convert a {type(value).__name__} to a NumPy array ({e})."
        ) from e
    if arr.dtype == object:
        raise TypeError(
            f"state_dict['{key}']: expected a tensor or array, got {type(value).__name__}."
        )
    return arr


# --------------------------------------------------------------------------- Flax side


def flax_layers(template: Any, conv_transpose: Collection[str] = ()) -> list[FlaxLayer]:
    """Groups a Flax variables tree by module path, in its (definition) order."""
    transposed = {norm_flax_path(p) for p in conv_transpose}
    grouped: dict[tuple[str, ...], dict[str, tuple[tuple[Any, ...], Any]]] = {}
    for key_path, leaf in walk_template(template):
        if _not_weights(template, key_path, leaf):
            continue
        module = tuple(str(k) for k in key_path[_collection_depth(template, key_path) : -1])
        grouped.setdefault(module, {})[str(key_path[-1])] = (key_path, leaf)
    layers, bad = [], []
    for path, leaves in grouped.items():
        kind = _flax_kind(path, leaves, transposed)
        if kind is None:
            bad.append(f"{flax_str(path)}: {sorted(leaves)}")
        else:
            layers.append(FlaxLayer(path, leaves, kind))
    if bad:
        raise ValueError(
            "bnjax.interop: Flax layers of an unknown kind (their variable names), "
            f"{bad}. Supported: Dense/Linear, Conv, ConvTranspose (kernel, bias), Embed "
            "(embedding), LayerNorm/GroupNorm (scale, bias) and bnjax.linen/nnx.BatchNorm "
            "(weight, bias, running_mean, running_var, num_batches_tracked)."
        )
    return layers


def _flax_kind(path: tuple[str, ...], leaves: Mapping[str, Any], transposed: set) -> str | None:
    names = set(leaves)
    if {"mean", "var"} & names:
        raise ValueError(
            f"bnjax.interop: '{flax_str(path)}' is a flax BatchNorm ({sorted(names)}): its "
            "running variance is biased and its momentum is Flax's, so PyTorch's numbers "
            "cannot be loaded into it exactly. Use `bnjax.linen.BatchNorm` / "
            "`bnjax.nnx.BatchNorm` in the Flax model (same call, PyTorch's numbers)."
        )
    if "kernel" in names and names <= {"kernel", "bias"}:
        nd = _ndim(leaves["kernel"][1])
        if nd == 2:
            return "dense"
        if nd < 2:
            return None
        auto = bool(path) and path[-1].startswith("ConvTranspose")
        return "conv_transpose" if auto or norm_flax_path(path) in transposed else "conv"
    if names == {"embedding"}:
        return "embed"
    if names and names <= {"scale", "bias"}:
        return "norm"
    if names and names <= set(BN_LEAVES):
        return "batchnorm"
    return None


def walk_template(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """`(key path, leaf)` in iteration (definition) order; nnx Variables are leaves."""
    out: list[tuple[tuple[Any, ...], Any]] = []

    def walk(node: Any, prefix: tuple[Any, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*prefix, k))
        elif isinstance(node, list | tuple) and not prefix:
            for i, v in enumerate(node):
                walk(v, (i,))
        else:
            out.append((prefix, node))

    walk(tree, ())
    return out


def _not_weights(template: Any, key_path: tuple[Any, ...], leaf: Any) -> bool:
    """Leaves that hold no torch counterpart: nnx RNG state, linen's other collections."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(leaf, nnx.RngState):
        return True
    node = template[key_path[0]] if isinstance(template, list | tuple) else template
    if _is_linen_variables(node):
        collection = key_path[1] if node is not template else key_path[0]
        return collection not in _COLLECTIONS
    return False


def looks_sorted(template: Any) -> bool:
    """Whether some module's children of different automatic-name types are sorted.

    `jax.jit`, `jax.eval_shape` and `jax.tree.map` rebuild dicts with sorted keys,
    which loses the call order that pairs Flax's automatic names with torch's modules.
    """
    found = False

    def walk(node: Any) -> None:
        nonlocal found
        children = [k for k, v in node.items() if isinstance(v, Mapping)]
        types = {str(k).rsplit("_", 1)[0] for k in children if _AUTO_NAME.match(str(k))}
        if len(types) > 1 and [str(k) for k in children] == sorted(str(k) for k in children):
            found = True
        for k in children:
            walk(node[k])

    for _, node in _module_trees(template):
        walk(node)
    return found


def _module_trees(template: Any) -> list[tuple[Any, Any]]:
    nodes = list(template) if isinstance(template, list | tuple) else [template]
    out = []
    for node in nodes:
        if _is_linen_variables(node):
            out += [(c, node[c]) for c in _COLLECTIONS if isinstance(node.get(c), Mapping)]
        elif isinstance(node, Mapping):
            out.append((None, node))
    return out


def _collection_depth(template: Any, key_path: tuple[Any, ...]) -> int:
    """How many leading key-path entries are not module names (collection, tuple index)."""
    depth = 0
    node = template
    if isinstance(node, list | tuple):
        depth, node = 1, node[key_path[0]]
    if _is_linen_variables(node):
        depth += 1
    return depth


def _is_linen_variables(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and type(node).__name__ != "State"
        and any(c in node for c in _COLLECTIONS)
    )


def leaf_value(leaf: Any) -> Any:
    """The array of a template leaf (an nnx Variable holds it)."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(leaf, nnx.Variable):
        return leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
    return leaf


def _norm_component(c: str) -> str:
    m = _LAYERS_N.match(c)
    return m.group(1) if m else c


def norm_flax_path(path: Sequence[Any] | str) -> str:
    """Flax path -> torch's default path: `/` -> `.`, `layers_N` and `layers/N` -> `N`."""
    parts = path.split("/") if isinstance(path, str) else [str(p) for p in path]
    parts = [p for p in parts if p]
    out: list[str] = []
    for i, p in enumerate(parts):
        if p == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
            continue  # nnx.Sequential: "layers", N
        out.append(_norm_component(p))
    return ".".join(out)


def flax_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path) or "<root>"


# --------------------------------------------------------------------------- signatures


def _torch_signature(layer: TorchLayer) -> tuple[Any, ...]:
    w = layer.leaves.get("weight")
    return (tuple(sorted(layer.leaves)), None if w is None else _ndim(w))


def _flax_signature(layer: FlaxLayer) -> tuple[Any, ...]:
    """What the torch layer of a Flax layer looks like: torch leaf names, weight ndim."""
    torch_names, nd = [], None
    for name, (_, leaf) in layer.leaves.items():
        if name == K.WEIGHT_NAME[layer.kind]:
            torch_names.append("weight")
            nd = _ndim(leaf_value(leaf))
        else:
            torch_names.append(name)
    return (tuple(sorted(torch_names)), nd)


# --------------------------------------------------------------------------- matching


def match(
    tlayers: list[TorchLayer],
    flayers: list[FlaxLayer],
    *,
    rename: Rename,
    mode: str | Matching,
) -> Matching:
    """Pairs torch and Flax layers: by path (default rule + rename), then by safe order.

    `mode` may be a `Matching` (from `match_calls`): its pairs are used as they are.
    """
    if isinstance(mode, Matching):
        return _given(tlayers, flayers, mode)
    if mode not in ("auto", "path", "order"):
        raise ValueError(
            f"bnjax.interop: match must be 'auto', 'path', 'order' or a Matching (from "
            f"`bnjax.interop.match_calls`), got {mode!r}."
        )
    to_flax_path = rename_fn(rename)
    pairs: dict[int, tuple[int, str]] = {}  # flax index -> (torch index, by)
    used: set[int] = set()
    if mode in ("auto", "path"):
        by_path = {norm_flax_path(f.path): i for i, f in enumerate(flayers)}
        for ti, t in enumerate(tlayers):
            fi = by_path.get(norm_flax_path(to_flax_path(t.path)))
            if fi is not None and fi not in pairs:
                pairs[fi] = (ti, "path")
                used.add(ti)
    problem, sorted_keys = "", False
    if mode in ("auto", "order"):
        tpaths = [tuple(t.path.split(".")) if t.path else () for t in tlayers]
        fpaths = [tuple(str(p) for p in f.path) for f in flayers]
        tkeys = [K.group_key(K.shapes(t.leaves), t.transposed) for t in tlayers]
        fkeys = [_flax_group_key(f) for f in flayers]
        new, problem, sorted_keys = O.order_pairs(
            tpaths,
            tkeys,
            fpaths,
            fkeys,
            {fi: ti for fi, (ti, _) in pairs.items()},
            tname=lambda i: tlayers[i].path,
            fname=lambda i: flax_str(flayers[i].path),
        )
        for fi, ti in new.items():
            pairs[fi] = (ti, "order")
            used.add(ti)
        # What is left pairs by leaf names and weight rank only: the conversion then
        # reports both shapes (an error either way, never a silent load).
        queues: dict[tuple[Any, ...], list[int]] = {}
        for ti in O.canonical_order(tpaths):
            if ti not in used:
                queues.setdefault(_torch_signature(tlayers[ti]), []).append(ti)
        for fi in O.canonical_order(fpaths):
            if fi in pairs:
                continue
            queue = queues.get(_flax_signature(flayers[fi]))
            if queue:
                ti = queue.pop(0)
                pairs[fi] = (ti, "order")
                used.add(ti)
    out = []
    for fi, f in enumerate(flayers):
        if fi in pairs:
            ti, by = pairs[fi]
            out.append(LayerMatch(tlayers[ti].path, flax_str(f.path), _kind(tlayers[ti], f), by))
    return Matching(
        tuple(out),
        tuple(t.path for ti, t in enumerate(tlayers) if ti not in used),
        tuple(flax_str(f.path) for fi, f in enumerate(flayers) if fi not in pairs),
        problem,
        sorted_keys,
    )


def _kind(t: TorchLayer, f: FlaxLayer) -> str:
    kind = f.kind
    if kind == "conv" and t.transposed:
        kind = "conv_transpose"
    w = t.leaves.get("weight")
    return K.conversion_kind(kind, None if w is None else _ndim(w))


def _flax_group_key(f: FlaxLayer) -> tuple[Any, ...]:
    shapes = {n: leaf_shape(leaf_value(v)) for n, (_, v) in f.leaves.items()}
    return K.group_key(K.flax_as_torch(shapes, f.kind), f.kind == "conv_transpose")


def _given(tlayers: list[TorchLayer], flayers: list[FlaxLayer], given: Matching) -> Matching:
    """A `Matching` from `match_calls`, checked against these layers."""
    tby = {t.path: t for t in tlayers}
    fby = {flax_str(f.path): f for f in flayers}
    bad = [p for p in given.pairs if p.torch not in tby or p.flax not in fby]
    if bad:
        raise ValueError(
            "bnjax.interop: the `match=` pairing names layers these weights do not have: "
            f"{[(p.torch, p.flax) for p in bad[:10]]}. Fix: compute it with "
            "`bnjax.interop.match_calls` on the same torch model and Flax model."
        )
    ft = {p.flax for p in given.pairs}
    tt = {p.torch for p in given.pairs}
    pairs = tuple(p for p in given.pairs)
    return Matching(
        pairs,
        tuple(t.path for t in tlayers if t.path not in tt),
        tuple(flax_str(f.path) for f in flayers if flax_str(f.path) not in ft),
    )


def rename_fn(rename: Rename) -> Callable[[str], str]:
    """torch module path -> the path to look up on the Flax side (torch's spelling)."""
    if rename is None:
        return lambda p: p
    if callable(rename) and not isinstance(rename, Mapping):

        def fn(p: str) -> str:
            new = rename(p)
            return p if new is None else norm_flax_path(str(new))

        return fn
    if not isinstance(rename, Mapping):
        raise TypeError(
            "bnjax.interop: rename must be a mapping {torch path prefix: Flax path} or a "
            f"function torch path -> Flax path, got {type(rename).__name__}."
        )
    table = {str(k): norm_flax_path(str(v)) for k, v in rename.items()}

    def by_prefix(p: str) -> str:
        for k in sorted(table, key=len, reverse=True):
            if p == k or p.startswith(k + "."):
                return table[k] + p[len(k) :] if table[k] else p[len(k) + 1 :]
        return p

    return by_prefix


# --------------------------------------------------------------------------- layouts


weight_to_flax = K.weight_to_flax
weight_to_torch = K.weight_to_torch


def _weight_name(kind: str) -> str:
    return K.WEIGHT_NAME[{"conv1x1_dense": "dense", "dense_conv1x1": "conv"}.get(kind, kind)]


def flax_leaf_name(torch_leaf: str, kind: str) -> str:
    return _weight_name(kind) if torch_leaf == "weight" else torch_leaf


def torch_leaf_name(flax_leaf: str, kind: str) -> str:
    return "weight" if flax_leaf == _weight_name(kind) else flax_leaf


def auto_named(path: Sequence[str]) -> list[str]:
    return [p for p in path if _AUTO_NAME.match(p)]


def check_count(arr: np.ndarray, key: str, dtype: Any) -> np.ndarray:
    """`num_batches_tracked` as `dtype` (int32 in bnjax, int64 in torch)."""
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 0:
        raise ValueError(
            f"'{key}' must be a non-negative integer scalar, got shape {arr.shape} and "
            f"dtype {arr.dtype}."
        )
    if np.dtype(dtype) == np.int32 and int(arr) > _INT32_MAX:
        raise ValueError(f"'{key}' = {int(arr)} does not fit int32 (max {_INT32_MAX}).")
    return np.asarray(arr, dtype)


def kind_doc(kind: str) -> str:
    return K.KIND_DOC[kind]
