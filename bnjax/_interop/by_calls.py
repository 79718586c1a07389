"""Pairing layers by what the models compute: `bnjax.interop.match_calls`.

Both models run once on the same example, in evaluation mode. Torch's leaf modules
are recorded with forward hooks (input and output of every call, in call order);
then the Flax model runs with each of its layers intercepted (`bnjax._model.calls`):
a Flax layer is paired with the not-yet-paired torch layer of the same kind and
shapes whose recorded *input* equals the Flax layer's input, and the Flax model then
goes on with that torch layer's recorded *output*. Names, key order, registration
order and call order play no part: a shortcut called first, 12 identical blocks,
sorted keys all pair the same. Last, the torch weights are loaded with the pairing
and both models run again: every paired layer's output must match torch's, or the
error names the first layer that diverges and by how much.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any, NamedTuple

import numpy as np

from bnjax._interop import kinds as K
from bnjax._interop import pairing as L
from bnjax._model.calls import record_calls

__all__ = ["TorchCall", "match_calls", "record_torch_calls", "same_layout"]


class TorchCall(NamedTuple):
    """One call of one torch leaf module."""

    path: str  # module path, "blocks.3.downsample.1"
    kind: str  # class name, "BatchNorm2d"
    input: np.ndarray  # first positional input (a copy)
    output: np.ndarray  # output (a copy, taken before any in-place op downstream)


def record_torch_calls(
    module: Any, args: tuple[Any, ...], paths: Collection[str], *, train: bool = False
) -> list[TorchCall]:
    """Runs a torch module once under `no_grad`, recording `paths`' calls.

    In eval mode by default (`train=True`: training mode, which moves its running
    statistics: pass a copy); the module's mode is restored afterwards.
    """
    torch = sys.modules.get("torch")
    if torch is None:  # a torch module was passed, so torch is importable
        import torch
    calls: list[TorchCall] = []
    wanted = set(paths)

    def hook(name: str):
        def fn(mod, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append(TorchCall(name, type(mod).__name__, _t2np(inputs[0]), _t2np(output)))

        return fn

    handles = [
        m.register_forward_hook(hook(name)) for name, m in module.named_modules() if name in wanted
    ]
    was_training = module.training
    try:
        module.train(train)
        with torch.no_grad():
            module(*args)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return calls


def _t2np(t: Any) -> np.ndarray:
    t = t.detach().cpu()
    if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
        t = t.float()
    return t.clone().numpy()


def same_layout(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """torch's array `a` in a Flax layer's layout `shape`: as is, channels last, squeezed."""
    a = np.asarray(a)
    if a.shape == tuple(shape):
        return a
    if a.ndim >= 3:
        last = np.moveaxis(a, 1, -1)
        if last.shape == tuple(shape):
            return last
        if last.size == int(np.prod(shape)) and [d for d in last.shape if d != 1] == [
            d for d in shape if d != 1
        ]:
            return last.reshape(shape)
    return None


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b64), initial=0.0)), 1e-30)
    return float(np.max(np.abs(a64 - b64), initial=0.0)) / scale


def _tolerance(dtype: Any) -> float:
    """Relative difference that still counts as "the same array" for inputs/outputs."""
    size = np.dtype(dtype).itemsize
    return 1e-2 if size <= 2 else (1e-3 if size <= 4 else 1e-8)


def match_calls(
    torch_model: Any,
    torch_inputs: Any,
    model: Any,
    inputs: Any,
    *,
    variables: Any = None,
    rename: L.Rename = None,
    conv_transpose: Collection[str] = (),
    verify: bool = True,
    **kwargs: Any,
) -> L.Matching:
    """Pairs a torch model's layers with a Flax model's by running both on one example.

    See the module docstring for how. Both models run in evaluation mode: torch's
    `eval()` (restored afterwards) and the Flax model with `**kwargs` (e.g.
    `train=False`); an nnx model runs as an `eval()` copy, so the model passed is
    untouched.

    Args:
      torch_model: a `torch.nn.Module`.
      torch_inputs: its example input (a tensor, or a tuple of positional inputs).
      model: the Flax model, a `flax.linen.Module` or an `nnx.Module`.
      inputs: the Flax model's example input (an array or a tuple), the same values
        in the Flax layout (e.g. `x.transpose(0, 2, 3, 1)`).
      variables: linen variables to run with (default: `model.init` with key 0; the
        values do not matter, every layer's output is torch's).
      rename: used only to break ties between layers that take the same input.
      conv_transpose: as in `from_torch`.
      verify: load the weights with the pairing and check every paired layer's
        output against torch's (default True).
      **kwargs: keyword inputs of the Flax model (linen: of `model.apply`).

    Returns:
      A `Matching` whose pairs are `by="calls"`; pass it as `from_torch(...,
      match=matching)` / `to_torch(..., match=matching)`.

    Example (needs torch; `docs/porting.md` runs it):

        matching = bnjax.interop.match_calls(torch_net, (x_nchw,), model, (x_nhwc,),
                                             train=False)
        variables = bnjax.interop.from_torch(torch_net, template, match=matching)

    Raises:
      ValueError: a Flax layer takes an input no torch layer of its kind and shapes
        takes (the code between layers differs: the error names the layer, the
        nearest torch layer and the difference), or a paired layer's output differs
        from torch's after loading (the first such layer is named).
    """
    from bnjax._interop.port import from_torch

    torch_inputs = torch_inputs if isinstance(torch_inputs, tuple) else (torch_inputs,)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    tlayers = L.torch_layers(torch_model, conv_transpose)
    tby = {t.path: t for t in tlayers}
    tcalls = record_torch_calls(torch_model, torch_inputs, tby)
    nnx_model = _nnx_eval_copy(model)
    if nnx_model is not None:
        from flax import nnx

        template = nnx.state(nnx_model)
        runner, run_vars = nnx_model, None
    else:
        if variables is None:
            import jax

            variables = model.init(jax.random.key(0), *inputs, **kwargs)
        template, runner, run_vars = variables, model, variables
    flayers = L.flax_layers(template, conv_transpose)
    fby = {tuple(f.path): f for f in flayers}
    fshapes = {p: K.shapes({n: L.leaf_value(v) for n, (_, v) in f.leaves.items()})
               for p, f in fby.items()}  # fmt: skip
    tshapes = {p: K.shapes(t.leaves) for p, t in tby.items()}
    rename_fn = L.rename_fn(rename)

    used: set[int] = set()
    flax_to_torch: dict[tuple[str, ...], str] = {}
    torch_to_flax: dict[str, tuple[str, ...]] = {}
    kinds: dict[tuple[str, ...], str] = {}
    history: list[tuple[tuple[str, ...], str]] = []
    ties: list[str] = []  # layers that took the same input as another of their shapes

    def replace(path, kind, x, computed):
        f = fby[path]
        x, out_shape = np.asarray(x), tuple(np.shape(computed))
        tol = _tolerance(x.dtype)
        found, nearest, compatible = [], None, []
        for i, tc in enumerate(tcalls):
            if i in used:
                continue
            if path in flax_to_torch and flax_to_torch[path] != tc.path:
                continue
            if tc.path in torch_to_flax and torch_to_flax[tc.path] != path:
                continue
            t = tby[tc.path]
            k = K.pair_kind(tshapes[tc.path], t.transposed, fshapes[path], f.kind)
            if k is None:
                continue
            tin, tout = same_layout(tc.input, x.shape), same_layout(tc.output, out_shape)
            if tin is None or tout is None:
                continue
            compatible.append(tc.path)
            err = _rel(x, tin)
            if nearest is None or err < nearest[0]:
                nearest = (err, tc)
            if err <= tol:
                found.append((err, i, tc, k, tout))
        if not found:
            raise _no_input_match(path, kind, x, nearest, compatible, history, ties)
        found.sort(key=lambda c: c[0])  # the closest input first (stable: call order)
        by_name = [c for c in found if L.norm_flax_path(rename_fn(c[2].path))
                   == L.norm_flax_path(path)]  # fmt: skip
        _, i, tc, k, tout = (by_name or found)[0]
        close = [c for c in found if c[0] <= max(10 * found[0][0], 1e-3 * tol)]
        if len(close) > 1 and not by_name:
            ties.append(
                f"`{L.flax_str(path)}` took torch's `{tc.path}` among "
                f"{[c[2].path for c in close[:4]]} (the same input)"
            )
        used.add(i)
        flax_to_torch[path], torch_to_flax[tc.path], kinds[path] = tc.path, path, k
        history.append((path, tc.path))
        import jax.numpy as jnp

        return jnp.asarray(tout, dtype=computed.dtype)

    record_calls(runner, run_vars, inputs, kwargs, layers=fby, replace=replace)
    pairs = tuple(
        L.LayerMatch(
            flax_to_torch[tuple(f.path)], L.flax_str(f.path), kinds[tuple(f.path)], "calls"
        )  # fmt: skip
        for f in flayers
        if tuple(f.path) in flax_to_torch
    )
    matching = L.Matching(
        pairs,
        tuple(t.path for t in tlayers if t.path not in torch_to_flax),
        tuple(L.flax_str(f.path) for f in flayers if tuple(f.path) not in flax_to_torch),
    )
    if verify:
        loaded = from_torch(torch_model, template, match=matching, strict=False,
                            dtype="template")  # fmt: skip
        _verify(runner, loaded, inputs, kwargs, fby, tcalls, flax_to_torch, nnx_model, ties)
    return matching


def _nnx_eval_copy(model: Any) -> Any:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(model, nnx.Module):
        return None
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return copy


def _verify(runner, loaded, inputs, kwargs, fby, tcalls, flax_to_torch, nnx_model, ties):
    if nnx_model is not None:
        from flax import nnx

        nnx.update(nnx_model, loaded)
        run_vars = None
    else:
        run_vars = loaded
    _, fcalls = record_calls(runner, run_vars, inputs, kwargs, layers=fby)
    seen: dict[str, int] = {}
    by_path: dict[str, list[TorchCall]] = {}
    for tc in tcalls:
        by_path.setdefault(tc.path, []).append(tc)
    for fc in fcalls:
        tpath = flax_to_torch.get(fc.path)
        if tpath is None:
            continue
        n = seen.get(tpath, 0)
        seen[tpath] = n + 1
        if n >= len(by_path[tpath]):
            continue
        tc = by_path[tpath][n]
        tol = _tolerance(fc.output.dtype)
        tout = same_layout(tc.output, fc.output.shape)
        tin = same_layout(tc.input, fc.input.shape)
        err_out = _rel(fc.output, tout)
        if err_out > tol:
            err_in = _rel(fc.input, tin)
            fpath = L.flax_str(fc.path)
            raise ValueError(
                f"bnjax.interop.match_calls: the Flax layer `{fpath}` ({fc.kind}) computes "
                f"something else than torch's `{tpath}` ({tc.kind}) with the same weights: "
                f"its output differs by {err_out:.1e} (relative; its input by {err_in:.1e}).\n"
                f"Fix: give `{fpath}` torch's settings (stride, padding, dilation, groups, "
                "epsilon, bias) and check the layout of its input; "
                "`bnjax.testing.locate_divergence` reports every layer's difference."
                + _ties_note(ties)
            )


def _ties_note(ties: list[str]) -> str:
    if not ties:
        return ""
    return (
        "\nLayers that took the same input as others of their kind and shapes were paired "
        f"by torch's call order, which may be wrong: {'; '.join(ties[:3])}. Pass "
        "`rename={torch_path: flax_path}` for them (it breaks such ties)."
    )


def _no_input_match(path, kind, x, nearest, compatible, history, ties) -> ValueError:
    fpath = L.flax_str(path)
    prev = (
        f"after `{L.flax_str(history[-1][0])}` (paired with torch's `{history[-1][1]}`)"
        if history
        else "from the model's input"
    )
    if nearest is None:
        return ValueError(
            f"bnjax.interop.match_calls: no torch layer of the kind and shapes of the Flax "
            f"layer `{fpath}` ({kind}, input {tuple(x.shape)}) is left to pair with.\n"
            "Fix: check that both models have the same layers (sizes, bias, kernel sizes) "
            "and are given the same example, in the same mode." + _ties_note(ties)
        )
    err, tc = nearest
    return ValueError(
        f"bnjax.interop.match_calls: the Flax layer `{fpath}` ({kind}) takes an input that "
        f"no torch layer takes: the nearest is torch's `{tc.path}` ({tc.kind}), "
        f"{err:.1e} apart (relative).\n"
        f"Fix: the computation {prev} up to `{fpath}` differs from torch's: make it the "
        "same (activations, pooling, residual adds, the input's layout and values)."
        + f"\nLayers of its kind and shapes still unpaired: {sorted(set(compatible))[:10]}."
        + _ties_note(ties)
    )
