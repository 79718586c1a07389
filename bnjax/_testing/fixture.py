"""PyTorch fixtures for equivalence tests: export one from torch, load it without.

Public as `bnjax.testing.export_fixture`, `load_fixture` and `Fixture`.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


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
      >>> load_fixture(path).meta["torch_version"]
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
