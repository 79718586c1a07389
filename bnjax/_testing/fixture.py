"""PyTorch fixtures for equivalence tests: export one from torch, load it without.

Public as `bnjax.testing.export_fixture`, `load_fixture` and `Fixture`.

A fixture is an `.npz` archive with a JSON `__meta__` entry and flat arrays named
`inputs/<i>`, `targets/<i>`, `extra/<name>`, `state_dict/init/<key>`, `eval/output/<i>`,
`train/output/<i>`, `state_dict/train/<key>` (after the training forward), `train/loss`,
`grads/<key>`, `steps/<k>/inputs/<i>`, `steps/<k>/targets/<i>` (the batch of step
k >= 1), `steps/<k>/loss`, `state_dict/step<k>/<key>`; and, computed by a float64 copy
of the model, the same names under `float64/` (the float64 reference).
"""

from __future__ import annotations

import copy
import json
import platform
import shlex
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bnjax._testing.stochastic import make_deterministic, train_mode

#: The layout `export_fixture` writes; `load_fixture` reads this one and the older 1.
FORMAT = 2


class Fixture(NamedTuple):
    """A loaded fixture: `meta` (the JSON metadata) and its flat `arrays`.

    `arrays` maps names (listed in the module docstring) to arrays, in the order they
    were written; `load_fixture` reads each array from the file only when it is used.
    """

    meta: dict[str, Any]  # versions, command, description, what was recorded
    arrays: Mapping[str, np.ndarray]  # name -> array (lazily read from the file)

    def state_dict(self, which: str = "init") -> dict[str, np.ndarray]:
        """The torch state_dict `"init"`, `"train"` or `"step<k>"`, in torch's key order."""
        return self._group(f"state_dict/{which}")

    def inputs(self, step: int = 0) -> tuple[np.ndarray, ...]:
        """The model's inputs (torch's layout) of the training pass or of step `step`."""
        if step and self._has(f"steps/{step}/inputs"):
            return tuple(self._group(f"steps/{step}/inputs").values())
        return tuple(self._group("inputs").values())

    def targets(self, step: int = 0) -> tuple[np.ndarray, ...]:
        """The loss's targets (after the outputs) of the training pass or of step `step`."""
        name = f"steps/{step}/targets" if step else "targets"
        if step and not self._has(name):
            name = "targets"
        return tuple(self._group(name).values()) if self._has(name) else ()

    def outputs(self, mode: str) -> tuple[np.ndarray, ...]:
        """The outputs in `"eval"` or `"train"` mode."""
        return tuple(self._group(f"{mode}/output").values())

    def extra(self, name: str) -> np.ndarray:
        """An array saved with `export_fixture(..., extra={name: array})`."""
        return self._group("extra")[name]

    def grads(self) -> dict[str, np.ndarray]:
        """The gradients of the loss after the training forward, by parameter name."""
        return self._group("grads")

    def loss(self, step: int = 0) -> np.ndarray:
        """The loss of the training pass (step 0) or of step `step`."""
        return self.arrays["train/loss" if not step else f"steps/{step}/loss"]

    @property
    def steps(self) -> int:
        """The number of recorded optimizer steps."""
        return int(self.meta.get("steps", 0))

    def float64(self) -> Fixture | None:
        """The float64 reference (same names, from a float64 copy of the model), or None."""
        if not self._has("float64"):
            return None
        return Fixture(self.meta, _Prefixed(self.arrays, "float64/"))

    def _has(self, prefix: str) -> bool:
        p = prefix + "/"
        return any(k.startswith(p) for k in self.arrays)

    def _group(self, prefix: str) -> dict[str, np.ndarray]:
        n = len(prefix) + 1
        names = [k for k in self.arrays if k.startswith(prefix + "/")]
        if not names:
            raise KeyError(
                f"bnjax.testing: the fixture has no '{prefix}/...' arrays; it holds "
                f"{sorted({k.rsplit('/', 1)[0] for k in self.arrays})}."
            )
        return {k[n:]: self.arrays[k] for k in names}


class _NpzArrays(Mapping):
    """The arrays of an `.npz` file, each read when it is looked up (nothing is cached)."""

    def __init__(self, npz: Any, names: Sequence[str]) -> None:
        self._npz = npz  # an open numpy NpzFile; closed with this object
        self._names = tuple(names)
        self._set = frozenset(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._set:
            raise KeyError(name)
        return self._npz[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __del__(self) -> None:
        npz = getattr(self, "_npz", None)
        if npz is not None:
            npz.close()


class _Prefixed(Mapping):
    """The entries of `base` whose names start with `prefix`, without the prefix."""

    def __init__(self, base: Mapping[str, np.ndarray], prefix: str) -> None:
        self._base = base
        self._prefix = prefix
        self._names = tuple(k[len(prefix) :] for k in base if k.startswith(prefix))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._base[self._prefix + name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_fixture(path: str | Path) -> Fixture:
    """Reads a fixture written by `export_fixture` (no torch needed), lazily.

    The metadata is read at once; each array is read from the file when it is looked
    up (`fixture.arrays[name]` or a method such as `state_dict()`), so a large fixture
    costs memory only for the parts a test uses.

    Args:
      path: the `.npz` file.

    Returns:
      A `Fixture` (its `meta` and arrays), with keys in the order they were written.

    Raises:
      ValueError: the file is not an `.npz` archive, or not one `export_fixture`
        wrote (no JSON `__meta__`, no `inputs/...` arrays); the message says what the
        file holds instead.

    Example:
      >>> import tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "f.npz")
      >>> np.savez(path, __meta__=np.asarray('{"torch_version": "2.13.0"}'),
      ...          **{"inputs/0": np.ones(2)})
      >>> load_fixture(path).meta["torch_version"]
      '2.13.0'
    """
    where = f"bnjax.testing.load_fixture: {path}"
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{where} is not an .npz archive that export_fixture wrote ({type(e).__name__}: {e})."
        ) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{where} holds a single array of shape {np.shape(npz)}, not an .npz archive that "
            "export_fixture wrote."
        )
    names = list(npz.files)
    data = [k for k in names if k != "__meta__"]
    listing = f"it holds {len(data)} arrays: {data[:5]}{' ...' if len(data) > 5 else ''}"
    if "__meta__" not in names:
        npz.close()
        raise ValueError(
            f"{where} has no '__meta__' entry; not a fixture that export_fixture wrote ({listing})."
        )
    try:
        raw = npz["__meta__"]
        meta = json.loads(str(raw))
    except (ValueError, TypeError) as e:
        npz.close()
        raise ValueError(
            f"{where}: its '__meta__' is not the JSON object export_fixture writes "
            f"(starts with {str(raw)[:60]!r}); not a bnjax.testing fixture ({listing})."
        ) from e
    if not isinstance(meta, dict):
        npz.close()
        raise ValueError(f"{where}: its '__meta__' is JSON but not an object: {str(raw)[:60]!r}.")
    if int(meta.get("format", 1)) > FORMAT:
        npz.close()
        raise ValueError(
            f"{where} has fixture format {meta['format']}, newer than this bnjax reads "
            f"({FORMAT}); upgrade bnjax."
        )
    names.remove("__meta__")
    if not any(k.startswith("inputs/") for k in names):
        npz.close()
        raise ValueError(
            f"{where} is not a fixture that export_fixture wrote: it has no 'inputs/<i>' "
            f"arrays ({listing}; made by {meta.get('command', 'an unknown command')!r})."
        )
    order = [k for k in meta.get("order", ()) if k in names]
    order += [k for k in names if k not in set(order)]
    return Fixture(meta, _NpzArrays(npz, order))


def export_fixture(
    path: str | Path,
    module: Any,
    inputs: Sequence[Any],
    *,
    loss: Callable[..., Any] | None = None,
    targets: Sequence[Any] = (),
    optimizer: Callable[[Any], Any] | None = None,
    steps: int | None = None,
    batches: Sequence[tuple[Sequence[Any], Sequence[Any]]] | None = None,
    float64: bool = True,
    stochastic: str = "deterministic",
    dropout_in_train: bool = False,
    extra: Mapping[str, Any] | None = None,
    description: str = "",
    command: str | None = None,
) -> Fixture:
    """Runs a torch module and saves what a JAX port must reproduce (needs torch).

    In order: the initial `state_dict`; the outputs in `eval()` mode (no gradient);
    the outputs in `train()` mode, the `state_dict` after that forward (updated running
    statistics) and, with `loss`, its value and the gradients of every parameter; with
    `optimizer`, optimizer steps and the state after each: step 0 uses those gradients,
    step k >= 1 a new training forward and backward on `batches[k - 1]` (or on the same
    inputs again). With `float64` (default) a float64 copy of the model does all of it
    again, saved under `float64/`: `check_model` judges a port's float32 error against
    PyTorch's own float32 error from it. The module itself is not changed (copies run).

    Stochastic layers (Dropout, stochastic depth, functional `F.dropout`, any random
    op) would make the training pass irreproducible. They are found by running the
    training forward three times on the same input: a module whose output changes while
    its inputs do not is put in eval mode, that module alone (`module.training =
    False`; its submodules, e.g. BatchNorms, keep training), and the fixture's metadata
    lists it under `deterministic_modules`. A module whose randomness does not follow
    `self.training` makes the export raise, naming it and the fix.

    Args:
      path: where to write the `.npz`.
      module: a `torch.nn.Module`.
      inputs: the positional inputs (tensors or arrays), in torch's layout.
      loss: `(outputs, *targets) -> scalar tensor` for the gradients (e.g.
        `lambda y, labels: F.cross_entropy(y, labels)`; `lambda y: y.square().mean()`
        without targets).
      targets: the arrays the loss takes after the outputs in the training pass.
      optimizer: `parameters -> torch.optim.Optimizer`, e.g.
        `lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)`; needs `loss`.
      steps: the number of optimizer steps to record (default: `1 + len(batches)`
        with `batches`, else 0).
      batches: `[(inputs, targets), ...]`, the batches of steps 1, 2, ... (step 0 is
        the training pass on `inputs`); without it every step reuses `inputs`.
      float64: also record the float64 reference (a float64 copy of the model and of
        the floating inputs); the file is about three times larger.
      stochastic: `"deterministic"` (default): put stochastic modules in eval mode as
        described above; `"raise"`: refuse them with an error naming each.
      dropout_in_train: keep stochastic layers as they are (no detection; the training
        pass is then not reproducible by a port: only for fixtures read by hand).
      extra: more arrays to save (e.g. a mask), read back with `fixture.extra(name)`.
      description: saved in the metadata.
      command: the exact command that makes the fixture (default: this process's
        interpreter and `argv`).

    Returns:
      The `Fixture` as `load_fixture` reads it back.

    Raises:
      ValueError: `optimizer`, `steps` or `batches` without `loss`; `steps` without
        `optimizer`; `steps` other than `1 + len(batches)`; a stochastic module that
        cannot be made deterministic (or any, with `stochastic="raise"`); a float64
        copy that does not compute in float64.
      ImportError: torch is not installed.
    """
    import torch

    where = "bnjax.testing.export_fixture"
    if steps is None:
        steps = 0 if batches is None else 1 + len(batches)
    if (optimizer is not None or steps or batches) and loss is None:
        raise ValueError(f"{where}: optimizer steps need a `loss`.")
    if bool(steps) != (optimizer is not None):
        raise ValueError(f"{where}: give both `optimizer` and `steps` > 0, or neither.")
    if batches is not None and steps != 1 + len(batches):
        raise ValueError(
            f"{where}: `batches` holds the batches of steps 1..{len(batches)} (step 0 is the "
            f"training pass on `inputs`), so steps must be {1 + len(batches)}, got {steps}."
        )
    if stochastic not in ("deterministic", "raise"):
        raise ValueError(
            f"{where}: stochastic must be 'deterministic' or 'raise', got {stochastic!r}."
        )

    def tensors(values: Sequence[Any]) -> list[Any]:
        return [v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for v in values]

    xs, ts = tensors(inputs), tensors(targets)
    later = [(tensors(b[0]), tensors(b[1])) for b in batches or ()]
    net = copy.deepcopy(module)
    quiet: list[str] = []
    if not dropout_in_train:
        quiet = make_deterministic(net, xs, refuse=stochastic == "raise")

    arrays: dict[str, np.ndarray] = {}

    def put(prefix: str, values: Any) -> None:
        if prefix.endswith("loss"):  # a scalar, saved under its own name
            arrays[prefix] = _np(values)
            return
        if isinstance(values, Mapping):
            items = values.items()
        elif isinstance(values, list | tuple):
            items = ((str(i), v) for i, v in enumerate(values))
        else:
            items = (("0", values),)
        for k, v in items:
            arrays[f"{prefix}/{k}"] = _np(v)

    put("inputs", xs)
    if ts:
        put("targets", ts)
    for k, (bx, bt) in enumerate(later, start=1):
        put(f"steps/{k}/inputs", bx)
        if bt:
            put(f"steps/{k}/targets", bt)
    if extra:
        put("extra", dict(extra))
    put("state_dict/init", net.state_dict())
    net64 = copy.deepcopy(net).double() if float64 else None  # before any step
    batch_list = [(xs, ts)] + (later or [(xs, ts)] * max(steps - 1, 0))
    opt_name, opt_defaults = _record(net, batch_list, loss, optimizer, steps, put, "")
    if float64:
        wide = [([_wide(x) for x in bx], [_wide(t) for t in bt]) for bx, bt in batch_list]
        _record(net64, wide, loss, optimizer, steps, put, "float64/")
        narrow = [k for k, v in arrays.items() if k.startswith("float64/") and v.dtype.kind == "f"
                  and v.dtype != np.float64]  # fmt: skip
        if narrow:
            raise ValueError(
                f"{where}: the float64 copy of the model computes {narrow[:3]} in "
                f"{arrays[narrow[0]].dtype}, not float64 (a cast inside forward?); make it "
                "follow its parameters' dtype, or pass float64=False (check_model then "
                "needs explicit tolerances)."
            )
    meta = {
        "format": FORMAT,
        "description": description,
        "command": command if command is not None else _command(),
        "module": type(module).__name__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "bnjax_version": _bnjax_version(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "dropout_in_train": dropout_in_train,
        "deterministic_modules": quiet,
        "float64_reference": bool(float64),
        "steps": steps,
        "step_batches": len(later),
        "optimizer": opt_name,
        "optimizer_defaults": opt_defaults,
        "order": list(arrays),
    }
    np.savez_compressed(path, __meta__=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    return load_fixture(path)


def _record(
    net: Any,
    batches: list[tuple[list[Any], list[Any]]],
    loss: Callable[..., Any] | None,
    optimizer: Callable[[Any], Any] | None,
    steps: int,
    put: Callable[[str, Any], None],
    prefix: str,
) -> tuple[str | None, dict[str, Any] | None]:
    """Runs eval, the training pass and the steps on `net`, saving under `prefix`."""
    import torch

    xs, ts = batches[0]
    net.eval()
    with torch.no_grad():
        put(prefix + "eval/output", net(*xs))
    train_mode(net)
    out = net(*xs)
    put(prefix + "train/output", out)
    put(prefix + "state_dict/train", net.state_dict())
    if loss is None:
        return None, None
    value = loss(out, *ts)
    value.backward()
    put(prefix + "train/loss", value)
    put(prefix + "grads", {k: p.grad for k, p in net.named_parameters() if p.grad is not None})
    if optimizer is None:
        return None, None
    opt = optimizer(net.parameters())
    for k in range(steps):
        if k:
            opt.zero_grad()
            bx, bt = batches[k]
            value = loss(net(*bx), *bt)
            value.backward()
            put(f"{prefix}steps/{k}/loss", value)
        opt.step()
        put(f"{prefix}state_dict/step{k}", net.state_dict())
    return type(opt).__name__, _jsonable(opt.defaults)


def _wide(t: Any) -> Any:
    return t.double() if t.is_floating_point() else t


def _command() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _bnjax_version() -> str:
    try:
        from importlib.metadata import version

        return version("bnjax")
    except Exception:  # not installed (a checkout on sys.path)
        return "unknown"


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
