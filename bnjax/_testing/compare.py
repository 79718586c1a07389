"""Comparing pytrees leaf by leaf, with a report naming each leaf's worst element.

Public as `bnjax.testing.assert_trees_close`, `Comparison` and `LeafComparison`.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    allowed: float = float("nan")  # the |got - expected| allowed there (tol_used = diff / allowed)
    torch_error: float | None = None  # PyTorch float32's own max |float32 - float64| on the leaf


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
    rows = [compare_leaf(k, a_flat[k], e_flat[k], rtol, atol) for k in e_flat]
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


def compare_leaf(path: str, a: Any, e: Any, rtol: float, atol: float) -> LeafComparison:
    a, e = np.asarray(a), np.asarray(e)
    if a.shape != e.shape:
        raise AssertionError(f"bnjax.testing: '{path}' has shape {a.shape}, expected {e.shape}.")
    exact = not (np.issubdtype(e.dtype, np.inexact) or np.issubdtype(a.dtype, np.inexact))
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    diff = np.abs(a64 - e64)
    both_nan = np.isnan(a64) & np.isnan(e64)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    with np.errstate(invalid="ignore", divide="ignore"):
        used = diff / (atol + rtol * np.abs(e64)) if not exact else np.where(diff > 0, np.inf, 0.0)
    # Equal elements pass whatever the tolerance (rtol=atol=0 gives 0/0 there).
    used = np.where(diff == 0, 0.0, np.where(np.isnan(used), np.inf, used))
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
        0.0 if exact else float(atol + rtol * abs(e64[i])),
    )


# --------------------------------------------------------------------------- rounding

#: `check_model`'s default factor: a port's error may be this many times PyTorch's own.
ROUNDING_FACTOR = 50.0
#: ...plus this many units in the last place of the leaf's largest value (exact copies).
FLOOR_ULPS = 8.0


def compare_rounding(
    got: Mapping[str, Any],
    reference: Mapping[str, Any],
    torch32: Mapping[str, Any],
    *,
    factor: float = ROUNDING_FACTOR,
    floor_ulps: float = FLOOR_ULPS,
) -> tuple[LeafComparison, ...]:
    """Judges one group of leaves against PyTorch's own float32 rounding.

    For a floating leaf computed in dtype `d`, with `e = max|got - reference|` (the
    float64 reference), `t = max|torch32 - reference|` (PyTorch float32's own error on
    the leaf) and `s = max|reference|`:

        e <= factor * (eps_d / eps_32) * max(t, T * s / S, tau) + floor_ulps * eps_d * s

    where `T` and `S` are the group's largest `t` and `s` (a leaf gets at least the
    group's relative rounding) and `tau` the median of the group's nonzero `t` (a
    leaf that PyTorch happens to compute exactly, such as a gradient that is zero in
    exact arithmetic, still gets the group's typical rounding). `eps_d / eps_32`
    predicts the rounding of another dtype from float32's: a float64 model is held to
    about `factor * 2e-9` times PyTorch's float32 error. Integer leaves must be equal.

    Args:
      got: `{path: array}`, the port's values.
      reference: `{path: array}`, the float64 reference (same paths).
      torch32: `{path: array}`, PyTorch's float32 values (same paths).
      factor: how many times PyTorch's own rounding a port may be off.
      floor_ulps: an absolute floor, in units of `eps_d * s`.

    Returns:
      One `LeafComparison` per leaf (`allowed` and `torch_error` filled in).

    Example:
      >>> ref = {"y": np.array([1.0, 2.0])}
      >>> t32 = {"y": np.array([1.0, 2.0 + 2e-7])}
      >>> got = {"y": np.array([1.0, 2.0 - 1e-6], np.float32)}  # a float32 port
      >>> row = compare_rounding(got, ref, t32)[0]
      >>> row.ok, round(row.torch_error, 12), float(row.allowed) > 1e-5
      (True, 2e-07, True)
      >>> compare_rounding({"y": np.array([1.0, 2.0 - 1e-6])}, ref, t32)[0].ok  # float64
      False
    """
    rows = []
    stats = {}
    for k, r in reference.items():
        r = np.asarray(r, np.float64) if np.asarray(r).dtype.kind == "f" else None
        if r is None or r.size == 0:
            continue
        t32 = np.asarray(torch32[k], np.float64)
        if t32.shape != r.shape:
            raise AssertionError(
                f"bnjax.testing: '{k}' has shape {t32.shape} in float32 and {r.shape} in the "
                "float64 reference; the fixture is inconsistent."
            )
        with np.errstate(invalid="ignore"):
            t = float(np.nanmax(np.abs(t32 - r), initial=0.0))
        stats[k] = (t, float(np.nanmax(np.abs(r), initial=0.0)))
    big_t = max((t for t, _ in stats.values()), default=0.0)
    big_s = max((s for _, s in stats.values()), default=0.0)
    nonzero = sorted(t for t, _ in stats.values() if t > 0)
    tau = nonzero[len(nonzero) // 2] if nonzero else 0.0
    eps32 = float(np.finfo(np.float32).eps)
    for k, r in reference.items():
        a = np.asarray(got[k])
        if k not in stats:  # integers (and empty leaves) are exact
            rows.append(compare_leaf(k, a, r, 0.0, 0.0))
            continue
        t, s = stats[k]
        eps = float(np.finfo(a.dtype).eps) if a.dtype.kind == "f" else eps32
        rounding = max(t, big_t * s / big_s if big_s else 0.0, tau) * eps / eps32
        allowed = factor * rounding + floor_ulps * eps * s
        row = compare_leaf(k, a, r, 0.0, allowed)
        rows.append(row._replace(torch_error=t))
    return tuple(rows)


# --------------------------------------------------------------------------- model checks


class GroupCheck(NamedTuple):
    """One group of `check_model` (`"eval"`, `"train"`, `"state"`, `"grads"`, `"steps"`)."""

    name: str
    leaves: int  # how many arrays were compared
    error: float  # largest |got - expected| over the group
    torch_error: float | None  # PyTorch float32's largest |float32 - float64|; None: unknown
    allowed: float  # the |diff| allowed at the worst leaf's worst element
    ratio: float  # that element's |diff| / allowed (the largest in the group); > 1 fails
    worst: str  # that leaf's path
    rule: str  # how `allowed` was set: "rounding x10" or "fixed rtol=..., atol=..."
    ok: bool
    note: str = ""  # why the group could not be compared (structure or shapes), if so


class ModelCheck(NamedTuple):
    """What `check_model` found: every group and every leaf; `print` it for the table."""

    groups: tuple[GroupCheck, ...]
    leaves: tuple[LeafComparison, ...]
    reference: str  # what the port was compared with: "float64" or "float32"

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.groups)

    @property
    def failures(self) -> tuple[GroupCheck, ...]:
        """The groups out of tolerance."""
        return tuple(g for g in self.groups if not g.ok)

    @property
    def max_abs_diff(self) -> float:
        return max((leaf.max_abs_diff for leaf in self.leaves), default=0.0)

    def group(self, name: str) -> GroupCheck:
        """The `GroupCheck` named `name`."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"bnjax.testing: no group {name!r}; have {[g.name for g in self.groups]}.")

    def raise_on_failure(self) -> ModelCheck:
        """Raises `AssertionError` listing every failing group and leaf; else returns self."""
        if self.ok:
            return self
        bad = [leaf for leaf in self.leaves if not leaf.ok]
        lines = [
            f"bnjax.testing.check_model: {len(self.failures)} of {len(self.groups)} groups out "
            f"of tolerance ({', '.join(g.name for g in self.failures)}); "
            f"{len(bad)} of {len(self.leaves)} leaves fail (compared with the {self.reference} "
            "reference).",
            *(f"{g.name}: {g.note}" for g in self.failures if g.note),
            str(self),
            "Failing leaves (worst element of each):",
            _leaf_table(bad),
        ]
        raise AssertionError("\n".join(lines))

    def __str__(self) -> str:
        head = (
            f"{'group':<6s} {'leaves':>6s} {'max |diff|':>10s} {'torch f32':>10s} "
            f"{'allowed':>10s} {'used':>7s}  {'rule':<22s} worst leaf"
        )
        lines = [head]
        for g in self.groups:
            torch_err = "-" if g.torch_error is None else f"{g.torch_error:.2e}"
            lines.append(
                f"{g.name:<6s} {g.leaves:>6d} {g.error:>10.2e} {torch_err:>10s} "
                f"{g.allowed:>10.2e} {g.ratio:>7.3f}  {g.rule:<22s} {g.worst}"
                + ("" if g.ok else "  <-- FAIL")
            )
        return "\n".join(lines)


def summarize_group(
    name: str, rows: tuple[LeafComparison, ...], rule: str, note: str = ""
) -> GroupCheck:
    """The `GroupCheck` of a group's leaf rows (the worst leaf: largest `tol_used`)."""
    if note:
        return GroupCheck(name, 0, float("inf"), None, 0.0, float("inf"), "", rule, False, note)
    if not rows:
        return GroupCheck(name, 0, 0.0, None, 0.0, 0.0, "", rule, True)
    worst = max(rows, key=lambda r: r.tol_used)
    torch_errors = [r.torch_error for r in rows if r.torch_error is not None]
    return GroupCheck(
        name,
        len(rows),
        max(r.max_abs_diff for r in rows),
        max(torch_errors) if torch_errors else None,
        worst.allowed,
        worst.tol_used,
        worst.path,
        rule,
        all(r.ok for r in rows),
    )


def flatten(tree: Any, name: str = "") -> dict[str, Any]:
    """`{path: leaf}` of a pytree, paths joined with "/" and prefixed with `name`."""
    return _flat(tree, name)


def _leaf_table(rows: list[LeafComparison]) -> str:
    return str(Comparison(tuple(rows)))
