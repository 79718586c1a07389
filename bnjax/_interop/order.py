"""Pairing by order, only where the order says something: the rules and their checks.

Layers the path rule does not pair (Flax's automatic names `Conv_0`, `Block_11`) are
paired by order among layers of the same *group* (torch's entry names and shapes, a
1x1 kernel squeezed: see `kinds.group_key`). Order is trusted only as far as it is
known:

- Numbered siblings (`Block_2` before `Block_10`, torch's `blocks.2` before
  `blocks.10`) are in number order whatever the dict order: `jax.jit`, `eval_shape`,
  tree maps and `.npz` files sort keys as strings, and this undoes that.
- A dict whose keys are in string order may have been sorted: there the order between
  siblings of different names (`BatchNorm_0` and `Block_0`, `bn1` and `downsample`) is
  unknown, and a group with members under two of them is ambiguous.
- torch's registration order need not be Flax's call order (torchvision's
  `BasicBlock` registers `downsample` last; Flax code often calls the shortcut
  first): every order pair in a group of two or more must have the same neighbours on
  both sides (the paired layer just before it, or just after it).

A group with one layer on each side needs no order. Anything else ambiguous is
reported, and `from_torch` / `to_torch` raise with the fix first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["canonical_order", "natural_key", "order_pairs"]

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def natural_key(name: str) -> tuple[str, int]:
    """`"Block_10"` -> `("Block_", 10)`; `"10"` -> `("", 10)`; `"fc"` -> `("fc", -1)`."""
    m = _NUMBERED.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)


class _Order:
    """A canonical order of module paths, and the nodes whose order is unknown."""

    def __init__(self, paths: Sequence[tuple[str, ...]]):
        children: dict[tuple[str, ...], list[str]] = {}
        for path in paths:
            for i in range(len(path)):
                kids = children.setdefault(path[:i], [])
                if path[i] not in kids:
                    kids.append(path[i])
        self.uncertain: dict[tuple[str, ...], list[str]] = {}
        rank: dict[tuple[str, ...], int] = {}
        for node, kids in children.items():
            if len(kids) >= 2 and kids == sorted(kids):
                kids = sorted(kids, key=natural_key)
                if len({natural_key(k)[0] for k in kids}) >= 2:
                    self.uncertain[node] = kids
            for i, k in enumerate(kids):
                rank[(*node, k)] = i
        self.key = {p: tuple(rank[p[: i + 1]] for i in range(len(p))) for p in paths}

    def sequence(self, items: Sequence[int], paths: Sequence[tuple[str, ...]]) -> list[int]:
        return sorted(items, key=lambda i: self.key[paths[i]])


def canonical_order(paths: Sequence[tuple[str, ...]]) -> list[int]:
    """Indices of `paths` in canonical order (number order for numbered siblings)."""
    return _Order(paths).sequence(range(len(paths)), paths)


def order_pairs(
    tpaths: Sequence[tuple[str, ...]],
    tkeys: Sequence[Any],
    fpaths: Sequence[tuple[str, ...]],
    fkeys: Sequence[Any],
    paired: dict[int, int],
    *,
    tname: Callable[[int], str],
    fname: Callable[[int], str],
) -> tuple[dict[int, int], str, bool]:
    """Pairs the layers `paired` (Flax index -> torch index) leaves, by group and order.

    Returns:
      `(pairs, problem, sorted_keys)`: Flax index -> torch index for the new pairs;
      `""` or a sentence saying why the order pairs cannot be trusted; and whether
      a Flax dict looked sorted where it mattered.
    """
    torder, forder = _Order(tpaths), _Order(fpaths)
    used_t = set(paired.values())
    tseq = torder.sequence([i for i in range(len(tpaths)) if i not in used_t], tpaths)
    fseq = forder.sequence([i for i in range(len(fpaths)) if i not in paired], fpaths)
    tgroups: dict[Any, list[int]] = {}
    for i in tseq:
        tgroups.setdefault(tkeys[i], []).append(i)
    fgroups: dict[Any, list[int]] = {}
    for i in fseq:
        fgroups.setdefault(fkeys[i], []).append(i)
    pairs: dict[int, int] = {}
    ambiguous: list[Any] = []
    for key, fs in fgroups.items():
        ts = tgroups.get(key, [])
        for fi, ti in zip(fs, ts, strict=False):
            pairs[fi] = ti
        if ts and max(len(ts), len(fs)) >= 2:
            ambiguous.append(key)
            if len(ts) != len(fs):
                return (
                    pairs,
                    (
                        f"{len(ts)} torch layers ({', '.join(tname(i) for i in ts[:3])}...) and "
                        f"{len(fs)} Flax layers ({', '.join(fname(i) for i in fs[:3])}...) "
                        "of the same kind and shapes are left after pairing by name, so which "
                        "goes with which is unknown"
                    ),
                    False,
                )
    amb = set(ambiguous)
    # Sorted dicts: the order between differently named siblings is unknown.
    for side, order, paths, groups, name in (
        ("Flax", forder, fpaths, fgroups, fname),
        ("torch", torder, tpaths, tgroups, tname),
    ):
        for key in amb:
            members = [i for i in groups.get(key, []) if (i in pairs if side == "Flax"
                       else i in pairs.values())]  # fmt: skip
            for node, kids in order.uncertain.items():
                classes: dict[str, int] = {}
                for i in members:
                    p = paths[i]
                    if len(p) > len(node) and p[: len(node)] == node:
                        classes.setdefault(_class(p[len(node)]), i)
                if len(classes) >= 2:
                    a, b = list(classes.values())[:2]
                    where = "/".join(node) or "the top level"
                    return (
                        pairs,
                        (
                            f"the {side} keys at {where} are in sorted order "
                            f"({', '.join(kids[:4])}...), so whether `{name(a)}` or `{name(b)}` "
                            "(same kind and shapes) comes first is unknown"
                        ),
                        side == "Flax",
                    )
    # Registration order vs call order: order pairs must have the same neighbours.
    all_pairs = {**paired, **pairs}
    t_of = {ti: fi for fi, ti in all_pairs.items()}
    tline = torder.sequence(list(t_of), tpaths)
    fline = forder.sequence(list(all_pairs), fpaths)
    tpos = {ti: k for k, ti in enumerate(tline)}
    fpos = {fi: k for k, fi in enumerate(fline)}
    for fi, ti in pairs.items():
        if fkeys[fi] not in amb:
            continue
        tk, fk = tpos[ti], fpos[fi]
        before = tk > 0 and fk > 0 and all_pairs[fline[fk - 1]] == tline[tk - 1]
        first = tk == 0 and fk == 0
        after = (
            tk + 1 < len(tline)
            and fk + 1 < len(fline)
            and all_pairs[fline[fk + 1]] == tline[tk + 1]
        )
        last = tk + 1 == len(tline) and fk + 1 == len(fline)
        if not (before or first or after or last):
            tprev = tname(tline[tk - 1]) if tk else "nothing"
            fprev = fname(fline[fk - 1]) if fk else "nothing"
            return (
                pairs,
                (
                    f"torch's `{tname(ti)}` would go into Flax's `{fname(fi)}` by order, but they "
                    f"sit in different places: torch's comes after `{tprev}`, Flax's after "
                    f"`{fprev}` (torch's registration order is not Flax's call order here)"
                ),
                False,
            )
    return pairs, "", False


def _class(name: str) -> str:
    return natural_key(name)[0]
