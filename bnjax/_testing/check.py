"""The implementation behind `bnjax.testing` (its docstring is the guide).

Equivalence tests of a JAX model against PyTorch: export a fixture, check a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._interop import port as _port
from bnjax._testing.compare import Comparison as Comparison
from bnjax._testing.compare import LeafComparison as LeafComparison
from bnjax._testing.compare import assert_trees_close as assert_trees_close
from bnjax._testing.fixture import Fixture as Fixture
from bnjax._testing.fixture import export_fixture as export_fixture
from bnjax._testing.fixture import load_fixture as load_fixture

__all__ = [
    "Comparison",
    "Fixture",
    "LeafComparison",
    "assert_trees_close",
    "check_model",
    "export_fixture",
    "load_fixture",
]

#: `(rtol, atol)` per group when `check_model` is not told otherwise (float32).
DEFAULT_TOLERANCES = MappingProxyType(
    {
        "eval": (1e-5, 1e-5),
        "train": (1e-5, 1e-5),
        "state": (1e-5, 1e-5),
        "grads": (1e-5, 1e-5),
        "steps": (1e-5, 1e-5),
    }
)


# --------------------------------------------------------------------------- models


def check_model(
    fixture: Fixture,
    model: Any,
    variables: Any,
    *,
    loss: Callable[[Any], Any] | None = None,
    inputs: Callable[..., Any] | None = None,
    outputs: Callable[[Any], Any] | None = None,
    optimizer: Any = None,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    **interop_options: Any,
) -> Comparison:
    """Checks that a Flax model reproduces a fixture: outputs, state, gradients, steps.

    Compares, in torch's names: the eval-mode outputs; the train-mode outputs; the
    state after the training forward (`variables` with updated `batch_stats`, exported
    with `bnjax.interop.to_torch`); the gradients of `loss`; and with `optimizer` (an
    optax transform equal to the torch optimizer) every recorded step's state.

    Args:
      fixture: from `load_fixture` (or `export_fixture`).
      model: a `flax.linen.Module` called as `model.apply(variables, *inputs,
        train=...)`, or a function `(variables, *inputs, train) -> (outputs,
        new_variables)` (e.g. for nnx: merge, call, split).
      variables: the model's variables holding the fixture's initial state (e.g.
        `bnjax.interop.from_torch(fixture.state_dict(), template)`). The trainable
        parameters are `variables["params"]` (linen) or `variables[0]` (a tuple).
      loss: `outputs -> scalar`, the same loss as the fixture's (needed for gradients).
      inputs: maps each torch-layout input to the model's (e.g. NCHW -> NHWC).
      outputs: maps the model's outputs to torch's layout.
      optimizer: an optax `GradientTransformation` for the recorded steps.
      tolerances: `{group: (rtol, atol)}` for the groups `"eval"`, `"train"`, `"state"`,
        `"grads"`, `"steps"` (defaults: `DEFAULT_TOLERANCES`).
      **interop_options: passed to `bnjax.interop.to_torch` (`rename`, `match`...).

    Returns:
      The `Comparison` of every leaf (print it for the measured differences).

    Raises:
      AssertionError: a group is out of tolerance (naming the worst element per leaf).

    Example:
      >>> kernel = np.array([[1.0], [2.0]], np.float32)
      >>> y = np.array([[3.0]], np.float32)
      >>> fixture = Fixture({}, {"inputs/0": np.ones((1, 2), np.float32),
      ...                        "eval/output/0": y, "train/output/0": y,
      ...                        "state_dict/train/fc.weight": kernel.T})
      >>> variables = {"params": {"fc": {"kernel": jnp.asarray(kernel)}}}
      >>> forward = lambda v, x, train: (x @ v["params"]["fc"]["kernel"], v)
      >>> check_model(fixture, forward, variables).ok
      True
    """
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    forward = jax.jit(_forward_fn(model), static_argnames="train")
    to_model = inputs or (lambda x: x)
    xs = tuple(jnp.asarray(to_model(x)) for x in fixture.inputs())
    to_torch_out = outputs or (lambda y: y)

    def close(group: str, got: Any, exp: Any) -> Comparison:
        rtol, atol = tol[group]
        return assert_trees_close(got, exp, rtol=rtol, atol=atol, name=group)

    def as_tuple(y: Any) -> tuple[Any, ...]:
        y = to_torch_out(y)
        return tuple(y) if isinstance(y, list | tuple) else (y,)

    def to_torch(tree: Any, reference: Mapping[str, Any]) -> dict[str, np.ndarray]:
        # jit sorts dict keys; Flax's automatic names pair in `variables`' call order.
        options = {"definition_order": variables, **interop_options}
        return _port.to_torch(tree, reference, **options)

    y_eval, _ = forward(variables, *xs, train=False)
    report = close("eval", as_tuple(y_eval), fixture.outputs("eval"))
    y_train, new_vars = forward(variables, *xs, train=True)
    report += close("train", as_tuple(y_train), fixture.outputs("train"))
    ref = fixture.state_dict("train")
    report += close("state", to_torch(new_vars, ref), ref)
    if loss is None:
        return report
    params, rebuild = _split_params(variables)

    def loss_of(p: Any, v: Any) -> tuple[Any, Any]:
        y, new = forward(rebuild(v, p), *xs, train=True)
        return loss(y), new

    grad_fn = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
    (value, _), grads = grad_fn(params, variables)
    report += close("train", {"loss": value}, {"loss": fixture.arrays["train/loss"]})
    grad_ref = fixture.grads()
    report += close("grads", to_torch(_as_params(grads), grad_ref), grad_ref)
    if optimizer is None:
        return report
    import optax

    opt_state = optimizer.init(params)
    current = new_vars
    for k in range(int(fixture.meta.get("steps", 0))):
        if k:
            (value, after_forward), grads = grad_fn(_split_params(current)[0], current)
            report += close(
                "steps", {f"loss{k}": value}, {f"loss{k}": fixture.arrays[f"steps/{k}/loss"]}
            )
            current = after_forward
        p, rebuild = _split_params(current)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        current = rebuild(current, optax.apply_updates(p, updates))
        ref = fixture.state_dict(f"step{k}")
        report += close("steps", to_torch(current, ref), ref)
    return report


def _forward_fn(model: Any) -> Callable[..., tuple[Any, Any]]:
    if hasattr(model, "apply") and hasattr(model, "init"):  # a flax.linen.Module

        def forward(variables: Any, *xs: Any, train: bool) -> tuple[Any, Any]:
            if not train:
                return model.apply(variables, *xs, train=False), variables
            y, updates = model.apply(variables, *xs, train=True, mutable=["batch_stats"])
            return y, {**variables, **updates}

        return forward
    return model


def _split_params(variables: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
    """(trainable params, rebuild(variables, params) -> variables)."""
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"], lambda v, p: {**v, "params": p}
    if isinstance(variables, tuple):
        return variables[0], lambda v, p: (p, *v[1:])
    raise TypeError(
        "bnjax.testing.check_model: cannot find the trainable parameters; pass linen "
        "variables {'params': ..., 'batch_stats': ...} or a tuple (params, rest...)."
    )


def _as_params(grads: Any) -> Any:
    """Gradients of the params collection, as a variables tree `to_torch` reads."""
    return grads if type(grads).__name__ == "State" else {"params": grads}
