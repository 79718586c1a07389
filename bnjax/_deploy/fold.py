"""Folding an eval-mode BatchNorm into the Dense or Conv that feeds it.

In eval mode a BatchNorm is a per-channel multiply-add,

    y = (z - running_mean) / sqrt(running_var + eps) * weight + bias = z * scale + shift,

so after a layer `z = x (*) K + b` it folds into that layer's kernel and bias:
`K' = K * scale` (along the output-channel axis), `b' = b * scale + shift`. Grouped
and depthwise convolutions need nothing special: BatchNorm scales *output* channels,
and each output channel owns its own slice of the kernel whatever the grouping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._core.conventions import STAT_KEYS

Array = jax.Array
Path = str | Sequence[str]

_BN_STAT_KEYS = STAT_KEYS[:2]  # what eval mode reads


def bn_scale_shift(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, eps: float = 1e-5
) -> tuple[Array, Array]:
    r"""BatchNorm in eval form: the per-channel `(scale, shift)` with `y = x * scale + shift`.

    $$\text{scale} = \frac{\text{weight}}{\sqrt{\text{running\_var} + \epsilon}}, \qquad
      \text{shift} = \text{bias} - \text{running\_mean} \cdot \text{scale}$$

    Computed in float32 at least (float64 stays float64).

    Args:
      params: the BatchNorm's `{"weight", "bias"}`, or `{}` (`affine=False`).
      batch_stats: its `{"running_mean", "running_var", ...}`; eval mode needs them.
      eps: the BatchNorm's `eps` (PyTorch's default `1e-5`).

    Returns:
      `(scale, shift)`, each of shape `(C,)`.

    Raises:
      ValueError: running statistics are missing (a BatchNorm with
        `track_running_stats=False` uses batch statistics in eval mode and cannot be
        folded), or the shapes disagree, or `eps <= 0`.

    Example:
      >>> params, stats = bnjax.init(3)
      >>> scale, shift = bn_scale_shift(params, stats)
      >>> scale.shape, shift.shape
      ((3,), (3,))
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"bn_scale_shift: `eps` must be a number > 0, got {eps!r}.")
    missing = [k for k in _BN_STAT_KEYS if k not in batch_stats]
    if missing:
        raise ValueError(
            "bn_scale_shift: batch_stats has no "
            f"{', '.join(repr(k) for k in missing)} (keys: {sorted(batch_stats)}). Only a "
            "BatchNorm with running statistics (`track_running_stats=True`) is a fixed "
            "per-channel affine map in eval mode, so only that one can be folded."
        )
    extra = sorted(set(params) - {"weight", "bias"})
    if extra:
        raise ValueError(
            f"bn_scale_shift: params has unexpected keys {extra}; expected "
            "{'weight', 'bias'} (bnjax / PyTorch names) or {} (affine=False)."
        )
    mean = jnp.asarray(batch_stats["running_mean"])
    var = jnp.asarray(batch_stats["running_var"])
    shapes = {"running_mean": mean.shape, "running_var": var.shape}
    shapes.update({k: np.shape(v) for k, v in params.items()})
    if mean.ndim != 1 or len(set(shapes.values())) != 1:
        raise ValueError(
            "bn_scale_shift: every per-channel array must have the same 1-D shape (C,), "
            f"got {shapes}."
        )
    dtype = jnp.promote_types(mean.dtype, jnp.float32)
    scale = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(eps, dtype))
    if "weight" in params:
        scale = scale * jnp.asarray(params["weight"]).astype(dtype)
    shift = -mean.astype(dtype) * scale
    if "bias" in params:
        shift = shift + jnp.asarray(params["bias"]).astype(dtype)
    return scale, shift


def fold_into_kernel(
    kernel: Any,
    bias: Any | None,
    scale: Any,
    shift: Any,
    *,
    layout: str | None = None,
) -> tuple[Array, Array]:
    """Folds a per-channel `y = z * scale + shift` into the layer that produced `z`.

    `K' = K * scale` along the kernel's output-channel axis and
    `b' = b * scale + shift` (`b = 0` when the layer has no bias), so the folded
    layer computes `x (*) K' + b' = (x (*) K + b) * scale + shift`.

    Args:
      kernel: the Dense or Conv kernel.
      bias: its bias of shape `(C_out,)`, or `None` for a layer without bias.
      scale: `(C_out,)`, e.g. from `bn_scale_shift`.
      shift: `(C_out,)`.
      layout: where the output channels are, one letter per kernel axis with `O`
        the output and `I` the input channels: `None` (default) is JAX's convention,
        output channels last (`HWIO` conv, `(in, out)` Dense, any rank); PyTorch is
        `"OIHW"` (Conv2d), `"OIW"` (Conv1d), `"OIDHW"` (Conv3d), `"OI"` (Linear).
        Grouped and depthwise kernels use the same layouts (PyTorch depthwise:
        `(C * multiplier, 1, kh, kw)` is `"OIHW"`; JAX: `(kh, kw, 1, C * m)` is
        `"HWIO"`).

    Returns:
      `(kernel', bias')` in the kernel's dtype; `bias'` always exists.

    Raises:
      ValueError: the layout does not match the kernel's rank, or the number of
        output channels differs from `scale`/`shift`/`bias`.

    Example:
      >>> k = jnp.ones((3, 3, 2, 4))                    # HWIO
      >>> k2, b2 = fold_into_kernel(k, None, 2 * jnp.ones(4), jnp.ones(4))
      >>> float(k2[0, 0, 0, 0]), float(b2[0])
      (2.0, 1.0)
    """
    kernel = jnp.asarray(kernel)
    out_axis = _output_axis(layout, kernel.shape)
    c_out = kernel.shape[out_axis]
    sizes = {"scale": np.shape(scale), "shift": np.shape(shift)}
    if bias is not None:
        sizes["bias"] = np.shape(bias)
    bad = {k: v for k, v in sizes.items() if v != (c_out,)}
    if bad:
        raise ValueError(
            f"fold_into_kernel: the kernel of shape {tuple(kernel.shape)} (layout "
            f"{layout or 'output channels last'}) has {c_out} output channels on axis "
            f"{out_axis}, but {', '.join(f'{k} has shape {v}' for k, v in bad.items())}. "
            "Is the BatchNorm paired with the right layer, and is the layout right "
            "(PyTorch kernels are 'OIHW', JAX kernels output-channels-last)?"
        )
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    scale = jnp.asarray(scale).astype(dtype)
    shape = [1] * kernel.ndim
    shape[out_axis] = c_out
    new_kernel = kernel.astype(dtype) * scale.reshape(shape)
    old_bias = jnp.zeros((c_out,), dtype) if bias is None else jnp.asarray(bias).astype(dtype)
    new_bias = old_bias * scale + jnp.asarray(shift).astype(dtype)
    bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
    return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def fold_batchnorms(
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    pairs: Sequence[tuple[Path, Path] | tuple[Path, Path, float]],
    *,
    eps: float | None = None,
    layout: str | None = None,
    kernel_key: str = "kernel",
    bias_key: str = "bias",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Folds every listed BatchNorm into the layer that feeds it, over a whole model.

    For each `(layer_path, bn_path)` the layer's `{kernel_key, bias_key}` in `params`
    becomes the folded kernel and bias (a bias is created when the layer had none),
    and the BatchNorm's entries are **removed** from both trees: at `bn_path` in
    `params` (its weight and bias) and in `batch_stats` (its running statistics).
    Run the folded model with those BatchNorms skipped (an identity). Nothing else
    changes; the caller's trees are not modified.

    Args:
      params: the model's parameters, nested mappings.
      batch_stats: the model's running statistics, nested like `params`.
      pairs: `(layer_path, bn_path)` or `(layer_path, bn_path, eps)` for each
        BatchNorm to fold, where a path is a tuple of keys (`("block1", "conv")`) or
        a `/`-separated string (`"block1/conv"`). The layer must directly feed the
        BatchNorm (no nonlinearity, pooling or residual add in between).
      eps: the `eps` of every BatchNorm listed without its own. There is no
        default: the trees do not record it, and a wrong `eps` gives silently wrong
        outputs. `bnjax.deploy.fold` reads each BatchNorm's `eps` from the model.
      layout: the kernels' layout, see `fold_into_kernel` (`None`: JAX's output
        channels last; `"OIHW"`/`"OI"` for trees converted from PyTorch).
      kernel_key: the kernel's key in a layer (`"kernel"` in Flax, `"weight"` in
        PyTorch `state_dict` trees).
      bias_key: the bias's key in a layer.

    Returns:
      `(folded_params, folded_batch_stats)`: new trees without the folded BatchNorms.

    Raises:
      KeyError: a path does not exist (the message names the missing key and the keys
        that exist at that level).
      ValueError: a BatchNorm is listed twice or has no running statistics, channel
        counts disagree, or a pair has no `eps` (neither its own nor `eps=`).

    Example:
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "bn": bnjax.init(4)[0]}
      >>> stats = {"bn": bnjax.init(4)[1]}
      >>> p, s = fold_batchnorms(params, stats, [("conv", "bn")], eps=1e-5)
      >>> sorted(p["conv"]), s
      (['bias', 'kernel'], {})
    """
    new_params = copy_dicts(params)
    new_stats = copy_dicts(batch_stats)
    seen: set[tuple[str, ...]] = set()
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) in (2, 3)):
            raise ValueError(
                f"fold_batchnorms: pairs[{i}] must be (layer_path, bn_path) or "
                f"(layer_path, bn_path, eps), got {pair!r}."
            )
        layer_path, bn_path = (as_path(p) for p in pair[:2])
        pair_eps = pair[2] if len(pair) == 3 else eps
        if pair_eps is None:
            raise ValueError(
                f"fold_batchnorms: no eps for BatchNorm {'/'.join(bn_path)}. The trees do not "
                "record a BatchNorm's eps and a wrong one silently shifts every output, so "
                "say it: eps=1e-5 (PyTorch's and bnjax's default) for all pairs, "
                "(layer_path, bn_path, eps) per pair, or use bnjax.deploy.fold(model, ...), "
                "which reads each BatchNorm's eps from the model."
            )
        if bn_path in seen:
            raise ValueError(f"fold_batchnorms: BatchNorm {'/'.join(bn_path)} is listed twice.")
        seen.add(bn_path)
        layer = _lookup(new_params, layer_path, "params", f"pairs[{i}] layer")
        bn_stats = _lookup(new_stats, bn_path, "batch_stats", f"pairs[{i}] BatchNorm")
        bn_params = _lookup(new_params, bn_path, "params", None)  # absent: affine=False
        if kernel_key not in layer:
            raise KeyError(
                f"fold_batchnorms: layer {'/'.join(layer_path)} has no {kernel_key!r} "
                f"(keys: {sorted(layer)}); pass kernel_key= (e.g. 'weight' for PyTorch trees)."
            )
        try:
            scale, shift = bn_scale_shift(bn_params or {}, bn_stats, eps=pair_eps)
            kernel, bias = fold_into_kernel(
                layer[kernel_key], layer.get(bias_key), scale, shift, layout=layout
            )
        except ValueError as e:
            raise ValueError(
                f"fold_batchnorms: folding BatchNorm {'/'.join(bn_path)} into layer "
                f"{'/'.join(layer_path)}: {e}"
            ) from e
        layer[kernel_key] = kernel
        layer[bias_key] = bias
        _delete(new_stats, bn_path)
        if bn_params is not None:
            _delete(new_params, bn_path)
    return new_params, new_stats


def _output_axis(layout: str | None, shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        raise ValueError(
            f"fold_into_kernel: a kernel needs at least 2 dimensions, got shape {tuple(shape)}."
        )
    if layout is None:
        return len(shape) - 1
    if (
        not isinstance(layout, str)
        or len(layout) != len(shape)
        or layout.count("O") != 1
        or layout.count("I") != 1
        or len(set(layout)) != len(layout)
    ):
        raise ValueError(
            f"fold_into_kernel: layout {layout!r} must have one distinct letter per kernel "
            f"axis ({len(shape)} for shape {tuple(shape)}) with exactly one 'O' and one "
            "'I', e.g. 'HWIO', 'OIHW', 'OI'."
        )
    return layout.index("O")


def as_path(path: Path) -> tuple[str, ...]:
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(path)


def copy_dicts(tree: Any) -> Any:
    """Copies the nested mappings (not the arrays) so the caller's tree is untouched."""
    if isinstance(tree, Mapping):
        return {k: copy_dicts(v) for k, v in tree.items()}
    return tree


def _lookup(tree: Any, path: tuple[str, ...], tree_name: str, what: str | None) -> Any:
    node = tree
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            if what is None:
                return None
            where = "/".join(path[:depth]) or "<root>"
            keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(
                f"fold_batchnorms: {what} path {'/'.join(path)!r} not found in {tree_name}: "
                f"no key {key!r} at {where} (keys there: {keys})."
            )
        node = node[key]
    if not isinstance(node, Mapping):
        if what is None:
            return None
        raise KeyError(
            f"fold_batchnorms: {what} path {'/'.join(path)!r} in {tree_name} is an array, "
            "not a layer's dict of arrays."
        )
    return node


def _delete(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
