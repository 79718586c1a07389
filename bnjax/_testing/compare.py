"""Comparing pytrees leaf by leaf, with a report naming each leaf's worst element.

Public as `bnjax.testing.assert_trees_close`, `Comparison` and `LeafComparison`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


class LeafComparison(NamedTuple):
    """One leaf: its worst element against the tolerance."""

    path: str  # "grads/layer1.0.conv1.weight"
    shape: tuple[int, ...]
    max_abs_diff: float  # largest |got - expected|
    tol_used: float  # largest |got - expected| / (atol + rtol |expected|); > 1 fails
    index: tuple[int, ...]  # where tol_used is largest
    got: float  # the actual value there
    expected: float  # the expected value there
    ok: bool


class Comparison(NamedTuple):
    """The per-leaf results of `assert_trees_close` / `check_model`; `print` it."""

    leaves: tuple[LeafComparison, ...]

    @property
    def ok(self) -> bool:
        return all(leaf.ok for leaf in self.leaves)

    @property
    def max_abs_diff(self) -> float:
        return max((leaf.max_abs_diff for leaf in self.leaves), default=0.0)

    def __str__(self) -> str:
        lines = [f"{'leaf':<48s} {'max |diff|':>10s} {'tol used':>9s}  worst element"]
        for c in self.leaves:
            flag = "" if c.ok else "  <-- FAIL"
            lines.append(
                f"{c.path:<48s} {c.max_abs_diff:>10.3e} {c.tol_used:>9.3f}  "
                f"{c.index}: got {c.got:.8g}, expected {c.expected:.8g}{flag}"
            )
        return "\n".join(lines)

    def __add__(self, other: Any) -> Comparison:  # type: ignore[override]
        return Comparison(self.leaves + tuple(other.leaves))


def assert_trees_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    name: str = "",
) -> Comparison:
    """Asserts `|actual - expected| <= atol + rtol |expected|` leaf by leaf.

    Integer and bool leaves must be equal (dtype kinds may differ: int32 vs int64).
    NaNs at the same places are equal. The structures (keys) must be equal.

    Args:
      actual: a pytree of arrays (JAX or NumPy).
      expected: a pytree with the same structure.
      rtol: relative tolerance.
      atol: absolute tolerance.
      name: prefixed to every leaf's path in the report.

    Returns:
      The `Comparison` (every leaf's worst element), when all leaves pass.

    Raises:
      AssertionError: a leaf is out of tolerance (the report names the worst element of
        every leaf), or the structures or shapes differ.

    Example:
      >>> r = assert_trees_close({"y": jnp.ones(3)}, {"y": np.ones(3)})
      >>> r.max_abs_diff
      0.0
    """
    a_flat = _flat(actual, name)
    e_flat = _flat(expected, name)
    if list(a_flat) != list(e_flat):
        missing = [k for k in e_flat if k not in a_flat]
        extra = [k for k in a_flat if k not in e_flat]
        raise AssertionError(
            f"bnjax.testing: the trees differ in structure; missing: {missing}, "
            f"unexpected: {extra}."
        )
    rows = [_compare_leaf(k, a_flat[k], e_flat[k], rtol, atol) for k in e_flat]
    report = Comparison(tuple(rows))
    if not report.ok:
        bad = [r.path for r in rows if not r.ok]
        raise AssertionError(
            f"bnjax.testing: {len(bad)} of {len(rows)} leaves out of tolerance "
            f"(rtol={rtol}, atol={atol}): {bad}\n{report}"
        )
    return report


def _flat(tree: Any, name: str) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        key = "/".join(_key_str(p) for p in path if _key_str(p) != "value")
        key = key or "array"
        out[f"{name}/{key}" if name else key] = leaf
    return out


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _compare_leaf(path: str, a: Any, e: Any, rtol: float, atol: float) -> LeafComparison:
    a, e = np.asarray(a), np.asarray(e)
    if a.shape != e.shape:
        raise AssertionError(f"bnjax.testing: '{path}' has shape {a.shape}, expected {e.shape}.")
    exact = not (np.issubdtype(e.dtype, np.inexact) or np.issubdtype(a.dtype, np.inexact))
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    diff = np.abs(a64 - e64)
    both_nan = np.isnan(a64) & np.isnan(e64)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    with np.errstate(invalid="ignore"):
        used = diff / (atol + rtol * np.abs(e64)) if not exact else np.where(diff > 0, np.inf, 0.0)
    used = np.where(both_nan, 0.0, np.where(np.isnan(used), np.inf, used))
    if a.size == 0:
        return LeafComparison(path, a.shape, 0.0, 0.0, (), float("nan"), float("nan"), True)
    i = np.unravel_index(int(np.argmax(used)), a.shape)
    return LeafComparison(
        path,
        a.shape,
        float(diff.max()),
        float(used[i]),
        tuple(int(j) for j in i),
        float(a64[i]),
        float(e64[i]),
        bool(used[i] <= 1.0),
    )
