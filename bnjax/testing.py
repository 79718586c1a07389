"""Equivalence tests of a JAX model against PyTorch: export a fixture, check a model.

Two halves that meet in one `.npz` file:

- `export_fixture` (needs torch) runs any `torch.nn.Module` on given inputs and saves
  what a port must reproduce: the state_dict, the outputs in eval and train mode, the
  state after the training forward (running statistics), the gradients of a loss, and
  optionally k optimizer steps; its `__meta__` holds the versions and the command.
- `load_fixture`, `check_model` and `assert_trees_close` (no torch) replay it with a
  Flax model or any JAX function and compare with per-group tolerances; a failure
  names the worst element of every leaf (path, index, got, expected).

A whole-model test, the torch side once:

    bnjax.testing.export_fixture("net.npz", torch_net, (x,), loss=lambda y: y.square().mean())

and then, without torch:

    fixture = bnjax.testing.load_fixture("net.npz")
    variables = bnjax.interop.from_torch(fixture.state_dict(), model.init(key, x_nhwc))
    bnjax.testing.check_model(fixture, model, variables, loss=lambda y: (y**2).mean(),
                              inputs=lambda x: x.transpose(0, 2, 3, 1))
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _port

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
DEFAULT_TOLERANCES = {
    "eval": (1e-5, 1e-5),
    "train": (1e-5, 1e-5),
    "state": (1e-5, 1e-5),
    "grads": (1e-5, 1e-5),
    "steps": (1e-5, 1e-5),
}


# --------------------------------------------------------------------------- fixtures


class Fixture(NamedTuple):
    """A loaded fixture: `meta` (the JSON metadata) and its flat `arrays`.

    Array names: `inputs/<i>`, `extra/<name>`, `state_dict/init/<key>`, `eval/output/<i>`,
    `train/output/<i>`, `state_dict/train/<key>` (after the training forward),
    `train/loss`, `grads/<key>`, `steps/<k>/loss`, `state_dict/step<k>/<key>`.
    """

    meta: dict[str, Any]  # versions, command, description, what was recorded
    arrays: dict[str, np.ndarray]  # name -> array, as listed above

    def state_dict(self, which: str = "init") -> dict[str, np.ndarray]:
        """The torch state_dict `"init"`, `"train"` or `"step<k>"`, in torch's key order."""
        return self._group(f"state_dict/{which}")

    def inputs(self) -> tuple[np.ndarray, ...]:
        """The model's inputs, in torch's layout."""
        return tuple(self._group("inputs").values())

    def outputs(self, mode: str) -> tuple[np.ndarray, ...]:
        """The outputs in `"eval"` or `"train"` mode."""
        return tuple(self._group(f"{mode}/output").values())

    def extra(self, name: str) -> np.ndarray:
        """An array saved with `export_fixture(..., extra={name: array})`."""
        return self._group("extra")[name]

    def grads(self) -> dict[str, np.ndarray]:
        """The gradients of the loss after the training forward, by parameter name."""
        return self._group("grads")

    def _group(self, prefix: str) -> dict[str, np.ndarray]:
        n = len(prefix) + 1
        out = {k[n:]: v for k, v in self.arrays.items() if k.startswith(prefix + "/")}
        if not out:
            raise KeyError(
                f"bnjax.testing: the fixture has no '{prefix}/...' arrays; it holds "
                f"{sorted({k.rsplit('/', 1)[0] for k in self.arrays})}."
            )
        return out


def load_fixture(path: str | Path) -> Fixture:
    """Reads a fixture written by `export_fixture` (no torch needed).

    Args:
      path: the `.npz` file.

    Returns:
      A `Fixture` (its `meta` and arrays), with keys in the order they were written.

    Example:
      >>> import tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "f.npz")
      >>> np.savez(path, __meta__=np.asarray('{"torch_version": "2.13.0"}'),
      ...          **{"inputs/0": np.ones(2)})
      >>> bnjax.testing.load_fixture(path).meta["torch_version"]
      '2.13.0'
    """
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "__meta__" not in arrays:
        raise ValueError(f"bnjax.testing: {path} has no '__meta__' entry; not a fixture.")
    meta = json.loads(str(arrays.pop("__meta__")))
    order = meta.get("order")
    if order:
        arrays = {k: arrays[k] for k in order if k in arrays}
    return Fixture(meta, arrays)


def export_fixture(
    path: str | Path,
    module: Any,
    inputs: Sequence[Any],
    *,
    loss: Callable[[Any], Any] | None = None,
    optimizer: Callable[[Any], Any] | None = None,
    steps: int = 0,
    dropout_in_train: bool = False,
    extra: Mapping[str, Any] | None = None,
    description: str = "",
    command: str | None = None,
) -> Fixture:
    """Runs a torch module and saves what a JAX port must reproduce (needs torch).

    In order: the initial `state_dict`; the outputs in `eval()` mode (no gradient);
    the outputs in `train()` mode, the `state_dict` after that forward (updated running
    statistics) and, with `loss`, its value and the gradients of every parameter; with
    `optimizer`, `steps` optimizer steps (the first uses those gradients, each later one
    a new training forward and backward on the same inputs) and the state after each.
    The module itself is not changed (a deep copy runs).

    Args:
      path: where to write the `.npz` (small models: the file holds every array).
      module: a `torch.nn.Module`.
      inputs: the positional inputs (tensors or arrays), in torch's layout.
      loss: `outputs -> scalar tensor` for the gradients (e.g. `lambda y: y.square().mean()`).
      optimizer: `parameters -> torch.optim.Optimizer`, e.g.
        `lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)`; needs `loss`.
      steps: the number of optimizer steps to record.
      dropout_in_train: keep Dropout layers active in the training pass. Their masks
        are random in both frameworks, so by default they are put in `eval()` there.
      extra: more arrays to save (e.g. the labels the loss uses), read back with
        `fixture.extra(name)`.
      description: saved in the metadata.
      command: the command that makes the fixture (default: this process's `argv`).

    Returns:
      The `Fixture` as `load_fixture` reads it back.

    Raises:
      ValueError: `optimizer` or `steps` without `loss`, or `steps` without `optimizer`.
      ImportError: torch is not installed.
    """
    import copy

    import torch

    if (optimizer is not None or steps) and loss is None:
        raise ValueError("bnjax.testing.export_fixture: optimizer steps need a `loss`.")
    if bool(steps) != (optimizer is not None):
        raise ValueError(
            "bnjax.testing.export_fixture: give both `optimizer` and `steps` > 0, or neither."
        )
    net = copy.deepcopy(module)
    xs = [torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x for x in inputs]
    arrays: dict[str, np.ndarray] = {}

    def put(prefix: str, values: Any) -> None:
        if isinstance(values, Mapping):
            items = values.items()
        elif isinstance(values, list | tuple):
            items = ((str(i), v) for i, v in enumerate(values))
        else:
            items = (("0", values),)
        for k, v in items:
            arrays[f"{prefix}/{k}"] = _np(v)

    def train_mode() -> None:
        net.train()
        if not dropout_in_train:
            for m in net.modules():
                if "Dropout" in type(m).__name__:
                    m.eval()

    put("inputs", xs)
    if extra:
        put("extra", dict(extra))
    put("state_dict/init", net.state_dict())
    net.eval()
    with torch.no_grad():
        put("eval/output", net(*xs))
    train_mode()
    out = net(*xs)
    put("train/output", out)
    put("state_dict/train", net.state_dict())
    if loss is not None:
        value = loss(out)
        value.backward()
        arrays["train/loss"] = _np(value)
        put("grads", {k: p.grad for k, p in net.named_parameters() if p.grad is not None})
    if optimizer is not None:
        opt = optimizer(net.parameters())
        for k in range(steps):
            if k:
                opt.zero_grad()
                value = loss(net(*xs))
                value.backward()
                arrays[f"steps/{k}/loss"] = _np(value)
            opt.step()
            put(f"state_dict/step{k}", net.state_dict())
    meta = {
        "description": description,
        "command": command
        if command is not None
        else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "module": type(module).__name__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "dropout_in_train": dropout_in_train,
        "steps": steps,
        "optimizer": None if optimizer is None else type(opt).__name__,
        "optimizer_defaults": None if optimizer is None else _jsonable(opt.defaults),
        "order": list(arrays),
    }
    np.savez_compressed(path, __meta__=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    return load_fixture(path)


def _np(t: Any) -> np.ndarray:
    """A tensor as a NumPy copy; bfloat16 becomes its exact float32 value."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy().copy()
    return np.array(t, copy=True)


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, bool | int | float | str | None) else repr(v) for k, v in d.items()
    }


# --------------------------------------------------------------------------- comparing


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
      >>> r = bnjax.testing.assert_trees_close({"y": jnp.ones(3)}, {"y": np.ones(3)})
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
