"""Stochastic layers of a torch module, found by running it and put in eval mode.

Used by `export_fixture`: a training pass with random masks (Dropout, stochastic
depth, functional `F.dropout`) cannot be reproduced by a port. A module is random when
its output changes across training forwards while its inputs do not; each such module
is put in eval mode alone (`module.training = False`, its submodules keep training),
and randomness that does not follow `self.training` is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Class names taken as stochastic before any run (their masks may coincide by chance).
STOCHASTIC_NAMES = ("Dropout", "DropPath", "DropBlock", "StochasticDepth", "Noise")
#: The attribute that marks a module `make_deterministic` put in eval mode.
_MARK = "_bnjax_deterministic"


def train_mode(net: Any) -> None:
    """`net.train()`, keeping the modules `make_deterministic` switched off in eval mode."""
    quiet = [m for m in net.modules() if getattr(m, _MARK, False)]
    net.train()
    for m in quiet:
        m.training = False


def make_deterministic(net: Any, xs: list[Any], *, refuse: bool = False) -> list[str]:
    """Finds the modules whose training pass is random and switches their own flag off.

    Runs the training forward on copies of `net` (its running statistics are not
    touched; torch's random stream is restored) and compares each module call's
    inputs and output across three runs; a module whose output changes while its
    inputs do not, and none of whose submodules does, is a source. Modules named like
    `STOCHASTIC_NAMES` count from the start. Repeats until the forward is reproducible.

    Args:
      net: a `torch.nn.Module` (changed: the sources are marked for `train_mode`).
      xs: its positional inputs.
      refuse: raise instead of switching anything off.

    Returns:
      The names of the modules `train_mode` keeps in eval mode, in the order found.

    Raises:
      ValueError: a source stays random in eval mode (its randomness ignores
        `self.training`), or, with `refuse`, any source; the message names each.
    """
    import torch

    with torch.random.fork_rng(devices=[]):  # the caller's random stream is not consumed
        quiet = _find_random(net, xs, refuse)
    modules = dict(net.named_modules())
    for n in quiet:
        setattr(modules[n], _MARK, True)
    return quiet


def _find_random(net: Any, xs: list[Any], refuse: bool) -> list[str]:
    names = {m: n for n, m in net.named_modules()}
    by_name = dict(net.named_modules())
    quiet: list[str] = [
        n for n, m in net.named_modules()
        if n and any(s in type(m).__name__ for s in STOCHASTIC_NAMES)
        and not list(m.children()) and getattr(m, "p", 1.0) != 0
    ]  # fmt: skip
    for _ in range(len(names) + 1):
        sources = _random_sources(net, xs, names, quiet)
        fresh = [n for n in sources if n not in quiet]
        if not sources:
            break
        if not fresh:
            raise ValueError(
                "bnjax.testing.export_fixture: the training pass stays random with "
                f"{_describe(by_name, sources)} in eval mode: their randomness does not "
                "follow `self.training` (e.g. `F.dropout(x, p)` without "
                "`training=self.training`, or `torch.rand` in forward). Make it follow "
                "`self.training`, or set the rate to 0 before exporting."
            )
        quiet += fresh
    if refuse and quiet:
        raise ValueError(
            "bnjax.testing.export_fixture: the training pass is random in "
            f"{_describe(by_name, sorted(quiet, key=list(by_name).index))}; a port cannot "
            "reproduce random masks. Pass stochastic='deterministic' (puts these modules "
            "alone in eval mode), or set their drop rates to 0 before exporting."
        )
    return quiet


def _describe(by_name: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"'{n or '<root>'}' ({type(by_name[n]).__name__})" for n in names)


def _random_sources(
    net: Any, xs: list[Any], names: Mapping[Any, str], quiet: Sequence[str]
) -> list[str]:
    """Modules whose output differs across 3 training forwards while their inputs do not."""
    import torch

    runs = []
    for _ in range(3):
        copy_ = copy.deepcopy(net)
        copy_names = {m: n for n, m in copy_.named_modules()}
        calls: list[tuple[str, Any, Any]] = []

        def hook(m: Any, args: Any, out: Any, calls=calls, copy_names=copy_names) -> None:
            calls.append((copy_names[m], _fingerprint(args), _fingerprint(out)))

        handles = [m.register_forward_hook(hook) for m in copy_.modules()]
        copy_.train()
        for m in copy_.modules():
            if copy_names[m] in quiet or getattr(m, _MARK, False):
                m.training = False
        with torch.no_grad():
            copy_(*xs)
        for h in handles:
            h.remove()
        runs.append(calls)
    flagged: set[str] = set()
    for other in runs[1:]:
        if [c[0] for c in other] != [c[0] for c in runs[0]]:
            continue  # a different call sequence: data-dependent control flow; skip
        for (name, a_in, a_out), (_, b_in, b_out) in zip(runs[0], other, strict=True):
            if _same(a_in, b_in) and not _same(a_out, b_out):
                flagged.add(name)

    def inside(child: str, parent: str) -> bool:
        return child != parent and (parent == "" or child.startswith(parent + "."))

    # The innermost flagged modules (a parent differs because a child does).
    return [n for n in names.values() if n in flagged and not any(inside(f, n) for f in flagged)]


def _fingerprint(value: Any) -> list[np.ndarray]:
    """A few thousand evenly spread elements (float64) of every tensor in `value`."""
    out: list[np.ndarray] = []

    def walk(v: Any) -> None:
        if hasattr(v, "detach") and hasattr(v, "dtype"):
            flat = v.detach().reshape(-1)
            stride = max(1, flat.numel() // 4096)
            out.append(flat[::stride].cpu().double().numpy().copy())
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)

    walk(value)
    return out


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Equal up to rounding (a nondeterministic kernel is not randomness)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return False
        scale = max(float(np.abs(x).max(initial=0.0)), 1e-30)
        if not np.all(np.abs(x - y) <= 1e-4 * scale):
            return False
    return True
