"""Static (trace-time) checks for `bnjax.apply`.

Every check here looks only at Python values, shapes and dtypes, never at traced
values, so it raises while tracing, before any computation, and it never changes
the caller's trees. Each message states the rule and the value that broke it.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._core.conventions import PARAM_KEY_SETS, PARAM_KEYS, check_unit_interval


def check_train(train: Any) -> bool:
    """`train` must be a concrete Python bool: it selects a different computation."""
    if isinstance(train, jax.core.Tracer):
        raise TypeError(
            "bnjax.apply: `train` must be a Python bool, but got a traced value "
            f"({train!r}). `train` selects a different computation (batch vs running "
            "statistics), so under `jax.jit` mark it static: "
            "`jax.jit(f, static_argnames='train')`."
        )
    if isinstance(train, (bool, np.bool_)):
        return bool(train)
    if isinstance(train, (jax.Array, np.ndarray)) and np.shape(train) == ():
        raise TypeError(
            f"bnjax.apply: `train` must be a Python bool, got a concrete array {train!r}. "
            "`train` picks the computation when it is traced, so an array cannot select "
            "it: pass `train=True` / `train=False` (or `bool(train)`), and under "
            "`jax.jit` mark it static: `jax.jit(f, static_argnames='train')`."
        )
    raise TypeError(
        f"bnjax.apply: `train` must be a Python bool, got {type(train).__name__} {train!r}."
    )


def check_hyperparameters(*, momentum: Any, eps: Any) -> None:
    """`eps > 0` and `momentum` in [0, 1] (or None), static Python numbers."""
    if isinstance(eps, jax.core.Tracer) or isinstance(momentum, jax.core.Tracer):
        raise TypeError(
            "bnjax.apply: `momentum` and `eps` must be static Python numbers, got a "
            "traced value; pass them as static arguments under `jax.jit`."
        )
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"bnjax.apply: `eps` must be a number > 0, got {eps!r}.")
    try:
        if momentum is not None:
            check_unit_interval("momentum", momentum)
    except ValueError:
        raise ValueError(
            "bnjax.apply: `momentum` must be a number in [0, 1] (PyTorch's convention: "
            f"the weight of the new batch) or None (cumulative average), got {momentum!r}. "
            "Coming from Flax? Its momentum=0.9 is PyTorch's 0.1: use "
            "`bnjax.momentum_from_flax`."
        ) from None


def check_keys(name: str, tree: Any, expected: Sequence[str]) -> None:
    """`tree` is `{}` or a mapping with exactly the `expected` keys."""
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"bnjax.apply: `{name}` must be a dict with keys {sorted(expected)} or {{}}, "
            f"got {type(tree).__name__}."
        )
    if not tree:
        return
    keys = set(tree)
    missing = sorted(set(expected) - keys)
    extra = sorted(keys - set(expected), key=str)
    if missing or extra:
        raise ValueError(
            f"bnjax.apply: `{name}` must have exactly the keys {list(expected)} (or be "
            f"{{}}); missing keys: {missing}, unexpected keys: {extra}."
        )


def check_x(x: Any, *, allow_1d: bool) -> jax.Array:
    """`x` is a floating-point array of rank >= 2 (>= 1 under a named axis)."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"bnjax.apply: `x` must be a floating-point array, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)}); cast it first, e.g. `x.astype(jnp.float32)`."
        )
    min_ndim = 1 if allow_1d else 2
    if x.ndim < min_ndim:
        raise ValueError(
            f"bnjax.apply: `x` must have at least 2 dimensions (a batch axis and a "
            f"feature axis), got shape {tuple(x.shape)}. Inside a per-example "
            "`jax.vmap` each call sees one example: give the vmap an axis name and pass "
            "it on, `jax.vmap(f, axis_name='batch')` with `bnjax.apply(..., "
            "axis_name='batch')`, so the statistics are taken over the mapped batch."
        )
    return x


def normalize_axes(axis: int | Iterable[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Canonical, sorted, non-negative feature axes; raises if any is out of range."""
    ndim = len(shape)
    raw = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not raw or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in raw):
        raise ValueError(
            f"bnjax.apply: `axis` must be an int or a non-empty tuple of ints, got {axis!r}."
        )
    bad = [a for a in raw if not -ndim <= a < ndim]
    if bad:
        raise ValueError(
            f"bnjax.apply: axis {axis!r} is out of range for x of shape {tuple(shape)} "
            f"(ndim {ndim})."
        )
    axes = tuple(sorted({int(a) % ndim for a in raw}))
    if len(axes) != len(raw):
        raise ValueError(f"bnjax.apply: `axis` {axis!r} names the same axis twice.")
    if len(axes) == ndim and ndim > 1:
        raise ValueError(
            f"bnjax.apply: axis {axis!r} leaves no axis to reduce over for x of shape "
            f"{tuple(shape)}."
        )
    return axes


def feature_shape_of(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in axes)


def check_params_keys(params: Any) -> None:
    """`params` is `{}`, `{"weight", "bias"}` or `{"weight"}` (PyTorch's `bias=False`)."""
    if not isinstance(params, Mapping):
        raise TypeError(
            "bnjax.apply: `params` must be a dict with keys ['weight', 'bias'], ['weight'] "
            f"(PyTorch's bias=False) or {{}}, got {type(params).__name__}."
        )
    keys = frozenset(params)
    if keys in PARAM_KEY_SETS:
        return
    if keys == {"bias"}:
        raise ValueError(
            "bnjax.apply: `params` has a 'bias' but no 'weight'. A BatchNorm's params are "
            "{'weight', 'bias'}, {'weight'} alone (PyTorch's BatchNorm(C, bias=False)) or {} "
            "(affine=False); for a bias without a scale, add 'weight': ones."
        )
    missing = sorted(set(PARAM_KEYS) - keys) if keys & set(PARAM_KEYS) else ["bias", "weight"]
    extra = sorted(keys - set(PARAM_KEYS), key=str)
    raise ValueError(
        "bnjax.apply: `params` must have exactly the keys ['weight', 'bias'], ['weight'] "
        f"(PyTorch's bias=False), or be {{}}; missing keys: {missing}, unexpected keys: "
        f"{extra}."
    )


def feature_mismatch_hint(
    x_shape: tuple[int, ...], axes: tuple[int, ...], feature_shape: tuple[int, ...]
) -> str:
    """A "did you mean `axis=...`?" for parameters whose size sits on another axis of `x`.

    The usual cause is PyTorch's NCHW layout with bnjax's default `axis=-1`
    (channels-last). The batch axis 0 is never suggested.

    Args:
      x_shape: the shape of `x`.
      axes: the feature axes that were used (canonical, as from `normalize_axes`).
      feature_shape: the shape of the per-feature arrays (`params['weight']` etc.).

    Returns:
      `" Did you mean `axis=1`? ..."` (with a leading space, to append to an error
      message), or `""` when no other axis of `x` has that shape.

    Example:
      >>> from bnjax._core.validate import feature_mismatch_hint
      >>> print(feature_mismatch_hint((8, 16, 10, 10), (3,), (16,)))
       Did you mean `axis=1`? x's axis 1 has 16 entries (PyTorch's NCHW layout puts the
      features there); pass `axis=1` explicitly.
    """
    ndim, feature_shape = len(x_shape), tuple(feature_shape)
    k = len(feature_shape)
    if not 0 < k < ndim:
        return ""
    candidates = [
        c
        for c in itertools.combinations(range(1, ndim), k)
        if c != tuple(axes) and tuple(x_shape[a] for a in c) == feature_shape
    ]
    if not candidates:
        return ""

    def spell(c: tuple[int, ...]) -> str:
        if len(c) == 1:
            return f"axis={-1 if c[0] == ndim - 1 else c[0]}"
        return f"axis={c}"

    options = " or ".join(f"`{spell(c)}`" for c in candidates[:3])
    first = candidates[0]
    if k == 1:
        where = f"axis {first[0]} has {x_shape[first[0]]} entries"
    else:
        where = f"axes {first} have sizes {tuple(x_shape[a] for a in first)}"
    why = " (PyTorch's NCHW layout puts the features there)" if first == (1,) else ""
    return f" Did you mean {options}? x's {where}{why}; pass `{spell(first)}` explicitly."


def check_mask(mask: Any, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """`mask` is boolean and broadcasts to `x`'s shape less the feature axes.

    Returns the mask broadcast to that shape (`(N, 1)` drops whole samples of an
    `(N, L, C)` input, as Flax's `mask` allows).
    """
    mask = mask if isinstance(mask, jax.Array) else jnp.asarray(mask)
    expected = tuple(d for a, d in enumerate(x_shape) if a not in axes)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"bnjax.apply: `mask` must be boolean, got dtype {mask.dtype}; e.g. "
            "`mask = lengths[:, None] > jnp.arange(L)`."
        )
    try:
        ok = mask.ndim <= len(expected) and (
            jnp.broadcast_shapes(tuple(mask.shape), expected) == expected
        )
    except ValueError:
        ok = False
    if not ok:
        hint = ""
        if mask.ndim == len(x_shape) and all(mask.shape[a] == 1 for a in axes):
            hint = (
                " (Flax's mask has x's rank; here the feature axes are left out: "
                f"`jnp.squeeze(mask, {axes if len(axes) > 1 else axes[0]})`.)"
            )
        raise ValueError(
            f"bnjax.apply: `mask` must have x's shape without the feature axes, "
            f"{expected} for x of shape {tuple(x_shape)} and feature axes {axes}, or "
            f"broadcast to it (e.g. {expected[:1] + (1,) * (len(expected) - 1)} to drop "
            f"whole samples); got mask of shape {tuple(mask.shape)}.{hint}"
        )
    return jnp.broadcast_to(mask, expected)
