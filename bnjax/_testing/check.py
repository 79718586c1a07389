"""The implementation behind `bnjax.testing` (its docstring is the guide).

Equivalence tests of a JAX model against PyTorch: export a fixture, check a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._interop import port as _port
from bnjax._testing.compare import (
    ROUNDING_FACTOR,
    LeafComparison,
    ModelCheck,
    compare_leaf,
    compare_rounding,
    flatten,
    summarize_group,
)
from bnjax._testing.fixture import Fixture

#: `(rtol, atol)` per group when the fixture has no float64 reference (older fixtures, or
#: `export_fixture(..., float64=False)`): the port is compared with PyTorch's float32.
DEFAULT_TOLERANCES = MappingProxyType(
    {
        "eval": (1e-5, 1e-5),
        "train": (1e-5, 1e-5),
        "state": (1e-5, 1e-5),
        "grads": (1e-5, 1e-5),
        "steps": (1e-5, 1e-5),
    }
)
GROUPS = tuple(DEFAULT_TOLERANCES)


# --------------------------------------------------------------------------- models


def check_model(
    fixture: Fixture,
    model: Any,
    variables: Any,
    *,
    loss: Callable[..., Any] | None = None,
    inputs: Callable[..., Any] | None = None,
    outputs: Callable[[Any], Any] | None = None,
    optimizer: Any = None,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    factor: float = ROUNDING_FACTOR,
    raise_on_failure: bool = True,
    precision: str | None = "highest",
    **interop_options: Any,
) -> ModelCheck:
    """Checks that a Flax model reproduces a fixture: outputs, state, gradients, steps.

    Compares, in torch's names, five groups: `"eval"` (the eval-mode outputs),
    `"train"` (the train-mode outputs and the loss), `"state"` (the variables after the
    training forward, i.e. updated `batch_stats`, exported with
    `bnjax.interop.to_torch`), `"grads"` (the gradients of `loss`) and, with
    `optimizer` (an optax transform equal to the torch optimizer), `"steps"`: every
    recorded step's loss and state, each step on the batch the fixture recorded for it.

    How close is close enough: when the fixture has a float64 reference (what
    `export_fixture` records by default), the port is compared with it and each leaf
    may be off by `factor` times PyTorch's own float32 error on that leaf, scaled to
    the port's dtype (`compare_rounding` gives the rule): a correct float32 port
    passes wherever PyTorch's float32 does, a float64 port is held to about 1e-12, a
    wrong port fails. Without a float64 reference, or for the groups named in
    `tolerances`, each element must satisfy `|got - expected| <= atol + rtol
    |expected|` against PyTorch's float32 values (`DEFAULT_TOLERANCES` by default).
    Every group is checked; the result says which rule each used.

    Args:
      fixture: from `load_fixture` (or `export_fixture`).
      model: a `flax.linen.Module` called as `model.apply(variables, *inputs,
        train=...)`, or a function `(variables, *inputs, train) -> (outputs,
        new_variables)` (e.g. for nnx: merge, call, split).
      variables: the model's variables holding the fixture's initial state (e.g.
        `bnjax.interop.from_torch(fixture.state_dict(), template)`). The trainable
        parameters are `variables["params"]` (linen) or `variables[0]` (a tuple). When
        they are float64 the inputs are widened to float64 too.
      loss: `(outputs, *targets) -> scalar`, the fixture's loss (needed for gradients);
        `targets` are the arrays the fixture recorded for each batch (none: `outputs
        -> scalar`).
      inputs: maps each torch-layout input to the model's (e.g. NCHW -> NHWC).
      outputs: maps the model's outputs to torch's layout.
      optimizer: an optax `GradientTransformation` for the recorded steps.
      tolerances: `{group: (rtol, atol)}`: fixed tolerances for these groups.
      factor: how many times PyTorch's own rounding a port may be off (float64
        reference only).
      raise_on_failure: raise at the end when a group fails (default); `False`
        returns the result to inspect (`result.ok`, `result.failures`).
      precision: the model runs under `jax.default_matmul_precision(precision)`:
        `"highest"` (default) keeps float32 matmuls and convolutions in float32 on
        GPUs and TPUs, where the default would be TF32 or bfloat16 passes, far above
        PyTorch's float32 rounding; `None` leaves the current setting.
      **interop_options: passed to `bnjax.interop.to_torch` (`rename`, `match`...).

    Returns:
      A `ModelCheck`: per group (`result.groups`) the largest difference, PyTorch's
      own float32 error, the allowed difference, the rule and pass/fail; per leaf
      (`result.leaves`) the worst element. `print(result)` shows the table.

    Raises:
      AssertionError: with `raise_on_failure`, after every group was checked, listing
        each failing group and leaf (worst element: path, index, got, expected).

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
    unknown = sorted(set(tolerances or ()) - set(GROUPS))
    if unknown:
        raise ValueError(
            f"bnjax.testing.check_model: unknown tolerance groups {unknown}; the groups are "
            f"{list(GROUPS)}."
        )
    ref64 = fixture.float64()
    params, rebuild = _split_params(variables)
    wide = _is_float64(params)
    forward = jax.jit(_forward_fn(model), static_argnames="train")
    to_model = inputs or (lambda x: x)
    to_torch_out = outputs or (lambda y: y)

    def model_inputs(step: int) -> tuple[Any, ...]:
        return tuple(_widen(jnp.asarray(to_model(x)), wide) for x in fixture.inputs(step))

    def targets(step: int) -> tuple[Any, ...]:
        return tuple(_widen(jnp.asarray(t), wide) for t in fixture.targets(step))

    def as_tuple(y: Any) -> tuple[Any, ...]:
        y = to_torch_out(y)
        return tuple(y) if isinstance(y, list | tuple) else (y,)

    state_ref = ref64 if (wide and ref64 is not None) else fixture

    def to_torch(tree: Any, which: str) -> dict[str, np.ndarray]:
        # jit sorts dict keys; Flax's automatic names pair in `variables`' call order.
        # The reference's dtypes are kept: float64 for a float64 model with a float64
        # reference, so nothing is narrowed before the comparison.
        options = {"definition_order": variables, **interop_options}
        reference = state_ref.state_dict(which) if which != "grads" else state_ref.grads()
        return _port.to_torch(tree, reference, **options)

    # Each group: (got, PyTorch float32, float64 reference or None), by path.
    found: dict[str, list[tuple[dict, dict, dict | None]]] = {g: [] for g in GROUPS}

    def add(group: str, got: Any, name: Callable[[Fixture], Any]) -> None:
        exp = name(fixture)
        found[group].append((got, exp, None if ref64 is None else name(ref64)))

    # Full float32 matmuls and convolutions (no TF32 on GPUs): PyTorch's CPU numbers.
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        xs = model_inputs(0)
        y_eval, _ = forward(variables, *xs, train=False)
        add("eval", _numbered(as_tuple(y_eval)), lambda f: _numbered(f.outputs("eval")))
        y_train, new_vars = forward(variables, *xs, train=True)
        add("train", _numbered(as_tuple(y_train)), lambda f: _numbered(f.outputs("train")))
        add("state", to_torch(new_vars, "train"), lambda f: f.state_dict("train"))
        if loss is not None:

            def loss_of(p: Any, v: Any, xs: Any, ts: Any) -> tuple[Any, Any]:
                y, new = forward(rebuild(v, p), *xs, train=True)
                return loss(y, *ts), new

            grad_fn = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
            (value, _), grads = grad_fn(params, variables, xs, targets(0))
            add("train", {"loss": value}, lambda f: {"loss": f.loss()})
            add("grads", to_torch(_as_params(grads), "grads"), lambda f: f.grads())
            if optimizer is not None:
                import optax

                opt_state = optimizer.init(params)
                current = new_vars
                for k in range(fixture.steps):
                    if k:
                        p, _ = _split_params(current)
                        (value, current), grads = grad_fn(p, current, model_inputs(k), targets(k))
                        add("steps", {f"{k}/loss": value}, lambda f, k=k: {f"{k}/loss": f.loss(k)})
                    p, rebuild_k = _split_params(current)
                    updates, opt_state = optimizer.update(grads, opt_state, p)
                    current = rebuild_k(current, optax.apply_updates(p, updates))
                    add("steps", _prefixed(to_torch(current, f"step{k}"), k),
                        lambda f, k=k: _prefixed(f.state_dict(f"step{k}"), k))  # fmt: skip

    groups, leaves = [], []
    for group, parts in found.items():
        if not parts:
            continue
        fixed = ref64 is None or group in (tolerances or {})
        rtol, atol = (tolerances or {}).get(group, DEFAULT_TOLERANCES[group])
        rule = f"fixed rtol={rtol:g}, atol={atol:g}" if fixed else f"rounding x{factor:g}"
        got, exp32, exp64 = {}, {}, {}
        for g, e32, e64 in parts:
            got.update(flatten(g, group))
            exp32.update(flatten(e32, group))
            if e64 is not None:
                exp64.update(flatten(e64, group))
        expected = exp32 if ref64 is None else exp64
        note = _structure_note(got, expected)
        if note:
            groups.append(summarize_group(group, (), rule, note))
            continue
        if fixed:
            rows = _fixed_rows(got, expected, rtol, atol)
        else:
            rows = compare_rounding(got, exp64, exp32, factor=factor)
        leaves += rows
        groups.append(summarize_group(group, rows, rule))
    result = ModelCheck(tuple(groups), tuple(leaves), "float32" if ref64 is None else "float64")
    return result.raise_on_failure() if raise_on_failure else result


def _fixed_rows(
    got: Mapping[str, Any], expected: Mapping[str, Any], rtol: float, atol: float
) -> tuple[LeafComparison, ...]:
    """The rows of `assert_trees_close` for flat trees with the same keys, without raising."""
    return tuple(compare_leaf(k, got[k], expected[k], rtol, atol) for k in expected)


def _structure_note(got: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """Why two flat trees cannot be compared (keys or shapes), or ""."""
    if list(got) != list(expected):
        missing = [k for k in expected if k not in got]
        extra = [k for k in got if k not in expected]
        if missing or extra:
            return f"the trees differ in structure; missing: {missing}, unexpected: {extra}."
    bad = [
        f"'{k}' has shape {np.shape(got[k])}, expected {np.shape(v)}"
        for k, v in expected.items()
        if np.shape(got[k]) != np.shape(v)
    ]
    return "; ".join(bad[:5]) + ("." if bad else "")


def _numbered(values: Any) -> dict[str, Any]:
    return {str(i): v for i, v in enumerate(values)}


def _prefixed(tree: Mapping[str, Any], k: int) -> dict[str, Any]:
    return {f"{k}/{key}": v for key, v in tree.items()}


def _is_float64(params: Any) -> bool:
    return any(
        getattr(leaf, "dtype", None) == jnp.float64 for leaf in jax.tree_util.tree_leaves(params)
    )


def _widen(x: Any, wide: bool) -> Any:
    return x.astype(jnp.float64) if wide and jnp.issubdtype(x.dtype, jnp.floating) else x


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
