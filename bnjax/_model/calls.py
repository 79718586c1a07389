"""A Flax model's layer calls, in call order: what each layer took and returned.

The record the port's pairing and the divergence locator read: run a linen module
(`flax.linen.intercept_methods`) or an nnx model (each recorded module's class gets a
wrapping `__call__` for the duration of the run) once, eagerly, and note every call of
the chosen layers: module path, class name, the array it took and the array it
returned. A `replace` callback may substitute a layer's output (the pairing feeds each
Flax layer PyTorch's output of the layer it pairs with).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Call", "record_calls"]

#: `replace(path, kind, x, computed) -> new output or None`: called after a recorded
#: layer ran on `x` (its first positional argument) and returned `computed`.
Replace = Callable[[tuple[str, ...], str, Any, Any], Any]


class Call(NamedTuple):
    """One call of one layer."""

    path: tuple[str, ...]  # module path, ("Block_3", "Conv_1") or ("body", "3", "conv_a")
    kind: str  # the module's class name, "Conv", "BatchNorm"
    input: np.ndarray  # the first positional argument, as NumPy
    output: np.ndarray  # what the model went on with (after `replace`), as NumPy


def record_calls(
    model: Any,
    variables: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    layers: Collection[tuple[str, ...]],
    replace: Replace | None = None,
    mutable: Any = False,
) -> tuple[Any, list[Call]]:
    """Runs a Flax model once, eagerly, recording every call of `layers`.

    Args:
      model: a `flax.linen.Module` (then `variables` are its variables) or an
        `nnx.Module` (then `variables` is ignored and the model is called as is).
      variables: linen variables, or None for nnx.
      args: the model's positional inputs.
      kwargs: its keyword inputs (e.g. `{"train": False}`).
      layers: the module paths to record (tuples of strings).
      replace: optional; its non-None result replaces a recorded layer's output.
      mutable: linen's `mutable=` for `apply` (e.g. `["batch_stats"]` for training).

    Returns:
      `(model output, calls)`, the calls in call order.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         h = nn.relu(nn.Dense(3)(x))
      ...         return nn.Dense(2)(h)
      >>> x = jnp.ones((1, 4))
      >>> v = Net().init(jax.random.key(0), x)
      >>> _, calls = record_calls(Net(), v, (x,), layers={("Dense_0",), ("Dense_1",)})
      >>> [(c.path, c.kind, c.output.shape) for c in calls]
      [(('Dense_0',), 'Dense', (1, 3)), (('Dense_1',), 'Dense', (1, 2))]
    """
    kwargs = dict(kwargs or {})
    wanted = {tuple(str(p) for p in path) for path in layers}
    calls: list[Call] = []

    def run_layer(path: tuple[str, ...], kind: str, call: Callable[[], Any], x: Any) -> Any:
        out = call()
        if replace is not None:
            new = replace(path, kind, x, out)
            if new is not None:
                out = new
        calls.append(Call(path, kind, _np(x), _np(out)))
        return out

    if _is_nnx(model):
        out = _run_nnx(model, args, kwargs, wanted, run_layer)
    else:
        out = _run_linen(model, variables, args, kwargs, wanted, run_layer, mutable)
    return out, calls


def _run_linen(model, variables, args, kwargs, wanted, run_layer, mutable):
    import flax.linen as nn

    def interceptor(next_fun, a, kw, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None or not a:
            return next_fun(*a, **kw)
        path = tuple(str(p) for p in module.scope.path)
        if path not in wanted:
            return next_fun(*a, **kw)
        return run_layer(path, type(module).__name__, lambda: next_fun(*a, **kw), a[0])

    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, mutable=mutable, **kwargs)


def _run_nnx(model, args, kwargs, wanted, run_layer):
    from flax import nnx

    by_id: dict[int, tuple[str, ...]] = {}
    for path, node in nnx.iter_graph(model):
        key = tuple(str(p) for p in path)
        if isinstance(node, nnx.Module) and key in wanted:
            by_id[id(node)] = key
    classes = {type(m) for _, m in nnx.iter_graph(model) if id(m) in by_id}
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}
    originals = {cls: cls.__call__ for cls in classes}

    def wrap(original):
        def __call__(self, *a, **kw):
            path = by_id.get(id(self))
            if path is None or not a:
                return original(self, *a, **kw)
            return run_layer(path, type(self).__name__, lambda: original(self, *a, **kw), a[0])

        return __call__

    try:
        for cls in classes:
            cls.__call__ = wrap(originals[cls])
        return model(*args, **kwargs)
    finally:
        for cls, method in saved.items():
            if method is None:
                del cls.__call__
            else:
                cls.__call__ = method


def _is_nnx(model: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is needed to have a model at all
        return False
    return isinstance(model, nnx.Module)


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)
