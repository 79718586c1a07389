"""The divergence locator: the first layer whose output leaves PyTorch's rounding.

A port that fails `check_model` says *that* the numbers differ, not *where*. This
runs the torch model and the Flax model on one batch, pairs their layers by what they
compute (`bnjax.interop.match_calls`), and compares every paired layer's output, in
evaluation and in training mode. "Beyond rounding" is measured, not guessed: torch's
own float32 and float64 runs of the same weights differ at each layer by what float32
rounding does there, and a layer diverges when the Flax output is further from
torch's than `factor` times that (for a float64 model, the float32 yardstick scaled by
float64's epsilon over float32's).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, NamedTuple

import numpy as np

from bnjax._interop import by_calls as B
from bnjax._interop import pairing as L
from bnjax._model.calls import record_calls

__all__ = ["Divergence", "LayerDivergence", "locate_divergence"]

_EPS32 = float(np.finfo(np.float32).eps)


class LayerDivergence(NamedTuple):
    """One paired layer call, compared."""

    mode: str  # "eval" or "train"
    torch: str  # torch module path
    flax: str  # Flax module path
    kind: str  # the Flax module's class
    error: float  # max |Flax output - torch output|
    rounding: float  # torch's own rounding there (see the module docstring)
    input_error: float  # max |Flax input - torch input|
    diverges: bool  # error > factor * rounding (+ a floor of a few ulps of the output)


class Divergence(NamedTuple):
    """What `locate_divergence` found: `first` per mode, and every layer compared.

    `print(result)` shows, per mode, the first diverging layer (or that none does)
    and the layers around it.
    """

    first: dict[str, LayerDivergence | None]  # mode -> first diverging layer, or None
    layers: tuple[LayerDivergence, ...]  # every paired call, per mode in Flax call order
    factor: float  # how many times torch's rounding counts as "beyond rounding"

    @property
    def ok(self) -> bool:
        """No layer diverges in any mode."""
        return all(v is None for v in self.first.values())

    def __str__(self) -> str:
        lines = []
        for mode, first in self.first.items():
            if first is None:
                n = sum(1 for d in self.layers if d.mode == mode)
                lines.append(
                    f"{mode}: all {n} layer calls within {self.factor:g}x torch's rounding"
                )
                continue
            lines.append(
                f"{mode}: first divergence at Flax `{first.flax}` ({first.kind}) <-> torch "
                f"`{first.torch}`: output off by {first.error:.1e} (torch's rounding "
                f"{first.rounding:.1e}), input off by {first.input_error:.1e}"
                + (" (its input already differs: look just before it)"
                   if first.input_error > self.factor * max(first.rounding, 1e-30)
                   else " (its input matches: this layer computes something else)")
            )  # fmt: skip
        return "\n".join(lines)


def locate_divergence(
    torch_model: Any,
    torch_inputs: Any,
    model: Any,
    variables: Any,
    inputs: Any,
    *,
    matching: Any = None,
    modes: tuple[str, ...] = ("eval", "train"),
    factor: float = 10.0,
    train_kwarg: str = "train",
    **kwargs: Any,
) -> Divergence:
    """The first layer whose outputs differ from PyTorch's beyond rounding, per mode.

    Args:
      torch_model: the `torch.nn.Module` (not changed: training runs on copies).
      torch_inputs: its batch (a tensor or a tuple).
      model: the Flax model: a `flax.linen.Module` (then `variables` are its
        variables and it is called with `train=False` / `train=True`, see
        `train_kwarg`) or an `nnx.Module` (then `variables` is ignored; copies run
        in `eval()` / `train()` mode).
      variables: the linen variables to check (e.g. `from_torch`'s), or None (nnx).
      inputs: the Flax model's batch, the same values in its layout (an array or a
        tuple).
      matching: a `Matching` from `bnjax.interop.match_calls` (computed if None).
      modes: which of `"eval"` and `"train"` to check.
      factor: how many times torch's own rounding a difference may be.
      train_kwarg: the linen model's mode keyword (None: the model takes none).
      **kwargs: further keyword inputs of the Flax model.

    Returns:
      A `Divergence`: `first[mode]` is the first diverging layer call (None when
      none does), `layers` every compared call; `print` it.

    Example (needs torch; `docs/porting.md` runs it):

        result = bnjax.testing.locate_divergence(torch_net, x_nchw, model, variables, x_nhwc)
        print(result)  # eval: first divergence at Flax `Block_5/BatchNorm_1` ...

    Raises:
      ValueError: the layers cannot be paired (see `match_calls`: its error names
        the layer whose input no torch layer takes).
    """
    import torch

    torch_inputs = torch_inputs if isinstance(torch_inputs, tuple) else (torch_inputs,)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    nnx = sys.modules.get("flax.nnx")
    is_nnx = nnx is not None and isinstance(model, nnx.Module)
    if matching is None:
        extra = {} if is_nnx or train_kwarg is None else {train_kwarg: False}
        matching = B.match_calls(
            torch_model, torch_inputs, model, inputs, verify=False, **extra, **kwargs
        )
    flax_to_torch = {p.flax: p.torch for p in matching.pairs}
    tpaths = set(flax_to_torch.values())
    fpaths = {tuple(p.split("/")) for p in flax_to_torch}
    dtype = next((t.dtype for t in torch_inputs if isinstance(t, torch.Tensor)), torch.float32)
    scale = float(torch.finfo(dtype).eps) / _EPS32 if dtype.is_floating_point else 1.0

    def twin(dt):
        m = copy.deepcopy(torch_model).to(dt)
        a = tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in torch_inputs)  # fmt: skip
        return m, a

    first: dict[str, LayerDivergence | None] = {}
    layers: list[LayerDivergence] = []
    for mode in modes:
        train = mode == "train"
        calls = {}
        for dt in (torch.float32, torch.float64, dtype):
            if dt in calls:
                continue
            m, a = twin(dt)
            calls[dt] = _by_path(B.record_torch_calls(m, a, tpaths, train=train))
        f_calls = _flax_calls(model, variables, inputs, kwargs, fpaths, train, is_nnx, train_kwarg)
        seen: dict[tuple[str, ...], int] = {}
        first[mode] = None
        for fc in f_calls:
            fpath = L.flax_str(fc.path)
            tpath = flax_to_torch.get(fpath)
            if tpath is None:
                continue
            n = seen.get(fc.path, 0)
            seen[fc.path] = n + 1
            if n >= len(calls[dtype].get(tpath, ())):
                continue
            ref = calls[dtype][tpath][n]
            r32, r64 = calls[torch.float32][tpath][n], calls[torch.float64][tpath][n]
            rounding = scale * float(np.max(np.abs(r32.output - r64.output), initial=0.0))
            out = B.same_layout(ref.output, fc.output.shape)
            inp = B.same_layout(ref.input, fc.input.shape)
            err = _maxdiff(fc.output, out)
            in_err = _maxdiff(fc.input, inp)
            floor = 4 * scale * _EPS32 * float(np.max(np.abs(ref.output), initial=0.0))
            d = LayerDivergence(
                mode, tpath, fpath, fc.kind, err, rounding, in_err,
                err > factor * max(rounding, floor),
            )  # fmt: skip
            layers.append(d)
            if d.diverges and first[mode] is None:
                first[mode] = d
    return Divergence(first, tuple(layers), factor)


def _by_path(calls: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in calls:
        out.setdefault(c.path, []).append(c)
    return out


def _maxdiff(a: Any, b: Any) -> float:
    if b is None:
        return float("inf")
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def _flax_calls(model, variables, inputs, kwargs, fpaths, train, is_nnx, train_kwarg):
    if is_nnx:
        from flax import nnx

        twin = nnx.merge(*nnx.split(model))
        twin.train() if train else twin.eval()
        return record_calls(twin, None, inputs, kwargs, layers=fpaths)[1]
    kw = dict(kwargs)
    if train_kwarg is not None:
        kw[train_kwarg] = train
    mutable = ["batch_stats"] if train else False
    return record_calls(model, variables, inputs, kw, layers=fpaths, mutable=mutable)[1]
