"""What a torch layer converts to: the conversion kind of a (torch layer, Flax layer) pair.

A torch module and a Flax layer can be paired when torch's entries, converted with
the Flax layer's kind, have exactly the Flax variables' names and shapes. One extra
rule: a 1x1 convolution and a Dense are the same computation (torch's
squeeze-excitation uses `Conv2d(C, r, 1)` on pooled features, Flax code `nn.Dense(r)`),
so a torch `Conv*d` weight `(O, I, 1, ..., 1)` loads into a Flax `Dense` kernel `(I, O)`
(kind `"conv1x1_dense"`) and a torch `Linear` weight `(O, I)` into a Flax 1x1 `Conv`
kernel `(1, ..., 1, I, O)` (kind `"dense_conv1x1"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["KIND_DOC", "group_key", "pair_kind", "weight_to_flax", "weight_to_torch"]

#: Flax leaf name of torch's `weight`, per Flax layer kind.
WEIGHT_NAME = MappingProxyType(
    {
        "dense": "kernel",
        "conv": "kernel",
        "conv_transpose": "kernel",
        "embed": "embedding",
        "norm": "scale",
        "batchnorm": "weight",
    }
)
KIND_DOC = MappingProxyType(
    {
        "dense": "Linear <-> Dense",
        "conv": "Conv <-> Conv",
        "conv_transpose": "ConvTranspose <-> ConvTranspose",
        "embed": "Embedding <-> Embed",
        "norm": "LayerNorm/GroupNorm <-> LayerNorm/GroupNorm",
        "batchnorm": "BatchNorm <-> bnjax BatchNorm",
        "conv1x1_dense": "Conv 1x1 <-> Dense",
        "dense_conv1x1": "Linear <-> Conv 1x1",
    }
)


def _unit_kernel(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 3 and all(k == 1 for k in shape[2:])


def conversion_kind(flax_kind: str, torch_weight_ndim: int | None) -> str:
    """The conversion of a pair: the Flax kind, or a 1x1-conv <-> Dense crossing."""
    if flax_kind == "dense" and torch_weight_ndim is not None and torch_weight_ndim >= 3:
        return "conv1x1_dense"
    if flax_kind == "conv" and torch_weight_ndim == 2:
        return "dense_conv1x1"
    return flax_kind


def weight_to_flax(w: np.ndarray, kind: str) -> np.ndarray:
    """A torch weight in the Flax layout of a conversion kind."""
    if kind == "dense":
        return w.T  # (out, in) -> (in, out)
    if kind == "conv":
        return np.transpose(w, (*range(2, w.ndim), 1, 0))  # (O, I/g, *K) -> (*K, I/g, O)
    if kind == "conv_transpose":
        # torch (I, O, *K) computes the gradient of a conv; Flax's ConvTranspose
        # (transpose_kernel=False) convolves the dilated input with its kernel unflipped.
        k = np.flip(w, axis=tuple(range(2, w.ndim)))
        return np.transpose(k, (*range(2, w.ndim), 0, 1))  # -> (*K, I, O)
    if kind == "conv1x1_dense":
        return w.reshape(w.shape[:2]).T  # (O, I, 1, 1) -> (I, O)
    if kind == "dense_conv1x1":
        return w.T  # (O, I) -> (I, O); the caller adds the unit kernel dims
    return w


def weight_to_torch(k: np.ndarray, kind: str, torch_shape: tuple[int, ...] | None = None):
    """A Flax kernel/scale/embedding in torch's layout (the inverse of `weight_to_flax`)."""
    n = k.ndim
    if kind == "dense":
        return k.T
    if kind == "conv":
        return np.transpose(k, (n - 1, n - 2, *range(n - 2)))
    if kind == "conv_transpose":
        w = np.transpose(k, (n - 2, n - 1, *range(n - 2)))
        return np.flip(w, axis=tuple(range(2, n)))
    if kind == "conv1x1_dense":
        w = k.T
        return w.reshape(torch_shape) if torch_shape is not None else w[:, :, None, None]
    if kind == "dense_conv1x1":
        return k.reshape(k.shape[-2:]).T  # (1, 1, I, O) -> (O, I)
    return k


def converted_shape(shape: tuple[int, ...], kind: str, target: tuple[int, ...]) -> tuple:
    """The Flax shape of a torch weight of `shape` under `kind` (`target`: the template's)."""
    out = weight_to_flax(np.empty(shape, np.bool_), kind).shape
    if kind == "dense_conv1x1" and len(target) > 2 and all(t == 1 for t in target[:-2]):
        return (*target[:-2], *out)
    return tuple(out)


def group_key(torch_leaves: Mapping[str, tuple[int, ...]], transposed: bool = False) -> tuple:
    """Layers that could hold each other's numbers share this key (torch's names, shapes).

    The weight's shape loses a 1x1 kernel, so 1x1 convolutions, Linears and Dense
    layers of the same sizes are grouped together; ConvTranspose weights keep theirs.
    """
    items = []
    for name, shape in sorted(torch_leaves.items()):
        shape = tuple(shape)
        if name == "weight" and not transposed and _unit_kernel(shape):
            shape = shape[:2]
        items.append((name, shape))
    return tuple(items)


def flax_as_torch(leaves: Mapping[str, tuple[int, ...]], kind: str) -> dict[str, tuple[int, ...]]:
    """A Flax layer's variables as the torch entries it would hold (names, shapes)."""
    out = {}
    for name, shape in leaves.items():
        shape = tuple(shape)
        if name == WEIGHT_NAME[kind]:
            if kind == "dense":
                shape = shape[::-1]
            elif kind == "conv":
                shape = (shape[-1], shape[-2], *shape[:-2])
            elif kind == "conv_transpose":
                shape = (shape[-2], shape[-1], *shape[:-2])
            out["weight"] = shape
        else:
            out[name] = shape
    return out


def pair_kind(
    torch_leaves: Mapping[str, tuple[int, ...]],
    transposed: bool,
    flax_leaves: Mapping[str, tuple[int, ...]],
    flax_kind: str,
) -> str | None:
    """The conversion kind if the torch layer fits the Flax layer exactly, else None."""
    kind = flax_kind
    if flax_kind == "conv" and transposed:
        kind = "conv_transpose"
    w = torch_leaves.get("weight")
    kind = conversion_kind(kind, None if w is None else len(w))
    names = {WEIGHT_NAME[flax_kind] if n == "weight" else n for n in torch_leaves}
    if names != set(flax_leaves) or (
        w is not None
        and kind in ("conv", "conv_transpose")
        and len(w) != len(flax_leaves[WEIGHT_NAME[flax_kind]])
    ):
        return None  # fmt: skip
    if w is not None and kind == "dense" and len(w) != 2:
        return None
    expected = {}
    for name, shape in torch_leaves.items():
        fname = WEIGHT_NAME[flax_kind] if name == "weight" else name
        target = tuple(flax_leaves.get(fname, ()))
        expected[fname] = converted_shape(tuple(shape), kind, target) if name == "weight" else (
            tuple(shape))  # fmt: skip
    got = {k: tuple(v) for k, v in flax_leaves.items()}
    return kind if expected == got else None


def shapes(leaves: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in leaves.items()}
