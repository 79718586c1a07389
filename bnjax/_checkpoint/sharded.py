"""Checkpoints of sharded training states from every process, with Orbax.

`save_checkpoint` writes one file from one process: every leaf must be fetched to
that host. A state sharded over many hosts (`jax.Array`s whose shards live in other
processes) is written instead by every process at once, each its own shards, with
Orbax (`orbax-checkpoint`, the JAX ecosystem's checkpointer), and restored on any
process count and any mesh: Orbax reads, for each device of the target sharding,
the part of each array it needs.

Layout of a checkpoint directory:

    path/state/       the Orbax checkpoint (OCDBT + Zarr, one data file per process)
    path/bnjax.json   {"format": "bnjax.sharded_checkpoint", "version": 1,
                       "orbax_checkpoint": version, "manifest": [[path, shape, dtype,
                       fingerprint], ...]}, written last, by process 0

`bnjax.json` is the commit marker: it is written (atomically) only after every
process finished writing its shards, so a save that died halfway has none and does
not restore. The guarantees of `save_checkpoint` hold: the manifest must match the
target exactly (paths, shapes, dtypes: Orbax alone casts a float32 array into a
bfloat16 target without a word), and every restored leaf must have the fingerprint
it was saved with, so that truncated or corrupted data is an error, never a silent
partial restore.

The fingerprint of a leaf is two 32-bit sums over its elements' bits, each word
weighted by an odd multiplier that depends on its position (sums modulo 2**32 are
exact in any order, so every process and every sharding computes the same value
with one all-reduce, and nothing is gathered). Any single flipped bit changes it;
so do moved elements. It guards against accidents, not tampering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._checkpoint.single import CheckpointError, compare_trees, like_tree
from bnjax._core.extras import require

FORMAT = "bnjax.sharded_checkpoint"
VERSION = 1
MANIFEST = "bnjax.json"
STATE = "state"

# Odd position weights 2 * K * i + 1 (mod 2**32) and a mixing multiplier.
_K1, _K2, _MIX = 0x3C6EF362, 0x0BD794EE, 0xC2B2AE3D


def save_sharded_checkpoint(
    path: str | os.PathLike[str], state: Any, *, overwrite: bool = False
) -> Path:
    """Saves a training state from every process: each writes its own shards.

    Call it in every process at once, with the same `path` (a folder every process
    can reach, e.g. a shared file system or a bucket Orbax supports) and the same
    state structure. `jax.Array` leaves may be sharded over any mesh of any
    processes; NumPy and Python scalar leaves must be the same in every process
    (process 0 writes them).

    Args:
      path: the checkpoint folder (created; parent folders too).
      state: a pytree of `jax.Array`s, NumPy arrays and Python scalars: dicts,
        lists, tuples, NamedTuples (optax states), `None`.
      overwrite: replace an existing checkpoint (default: refuse).

    Returns:
      The folder written.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
      TypeError: a leaf is a typed PRNG key (save `jax.random.key_data(key)`) or
        not an array or scalar.
      ImportError: orbax-checkpoint is not installed.

    Example:
      >>> state = {"params": {"w": jnp.ones(3)}, "step": 7}
      >>> save_sharded_checkpoint("/tmp/bnjax_sharded", state, overwrite=True)
      PosixPath('/tmp/bnjax_sharded')
    """
    ocp = _orbax()
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"save_sharded_checkpoint: {path} exists; pass overwrite=True to replace it."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(p) for p, _ in leaves]
    values = [_check_leaf(name, leaf) for name, (_, leaf) in zip(names, leaves, strict=True)]
    manifest = [
        [name, list(np.shape(v)), np.dtype(v.dtype).name, fp]
        for name, v, fp in zip(names, values, _fingerprints(values), strict=True)
    ]
    _barrier("bnjax_save_sharded_checkpoint_checked")  # all looked before anyone writes
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # uncommitted until the new one is written
    _barrier("bnjax_save_sharded_checkpoint_start")
    with _draining_event_loops():
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(
                path / STATE, jax.tree_util.tree_unflatten(treedef, values), force=True
            )
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
    if jax.process_index() == 0:
        header = {
            "format": FORMAT,
            "version": VERSION,
            "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
            "manifest": manifest,
        }
        tmp = path / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(header, indent=1))
        os.replace(tmp, path / MANIFEST)
    _barrier("bnjax_save_sharded_checkpoint_done")
    return path


def restore_sharded_checkpoint(path: str | os.PathLike[str], target: Any) -> Any:
    """Restores a sharded checkpoint into `target`'s structure and shardings, or raises.

    Call it in every process at once. The process count and the mesh may differ
    from those that saved it: each `jax.Array` leaf of `target` (or a
    `jax.ShapeDtypeStruct` with a `sharding`) says where its restored value goes.
    The saved manifest must match `target` exactly (paths, shapes, dtypes), and every
    restored leaf must match the fingerprint it was saved with.

    Args:
      path: a folder written by `save_sharded_checkpoint`.
      target: the pytree to restore into: `jax.Array`s (their shardings are used,
        not their values), `jax.ShapeDtypeStruct`s with a sharding, NumPy arrays,
        Python scalars.

    Returns:
      A pytree of `target`'s structure holding the saved values: `jax.Array`s with
      the target's shardings, NumPy arrays, Python scalars.

    Raises:
      FileNotFoundError: no checkpoint folder at `path`.
      CheckpointError: (a `ValueError`) the save did not finish (no `bnjax.json`),
        the folder is not a bnjax sharded checkpoint, its data is truncated or
        corrupted (unreadable, or a fingerprint differs), or it was saved from a
        different structure (the message lists the missing, unexpected and
        mismatched paths). Nothing is returned in part.
      ValueError: a `jax.ShapeDtypeStruct` leaf of `target` has no sharding.

    Example:
      >>> state = {"params": {"w": jnp.ones(3)}, "step": 7}
      >>> _ = save_sharded_checkpoint("/tmp/bnjax_sharded", state, overwrite=True)
      >>> target = {"params": {"w": jnp.zeros(3)}, "step": 0}
      >>> restore_sharded_checkpoint("/tmp/bnjax_sharded", target)["step"]
      7
    """
    ocp = _orbax()
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"restore_sharded_checkpoint: no checkpoint folder at {path}.")
    header = _read_manifest(path)
    saved = {
        name: (tuple(shape), dtype, i)
        for i, (name, shape, dtype, _) in enumerate(header["manifest"])
    }
    target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    problems = compare_trees(saved, target_leaves)
    if problems:
        raise CheckpointError(
            f"restore_sharded_checkpoint: {path} was saved from a different structure than "
            "the target; nothing was restored:\n  " + "\n  ".join(problems)
        )
    names = [jax.tree_util.keystr(p) for p, _ in target_leaves]
    abstract = [
        _abstract(name, leaf, saved[name][1])
        for name, (_, leaf) in zip(names, target_leaves, strict=True)
    ]
    with _draining_event_loops():
        checkpointer = ocp.StandardCheckpointer()
        try:
            abstract_tree = jax.tree_util.tree_unflatten(treedef, abstract)
            restored = checkpointer.restore(path / STATE, abstract_tree)
        except Exception as e:
            raise CheckpointError(
                f"restore_sharded_checkpoint: the data in {path / STATE} cannot be read; it "
                f"is truncated or corrupted ({type(e).__name__}: {str(e)[:500]})."
            ) from e
        finally:
            checkpointer.close()
    values = jax.tree.leaves(restored)
    if len(values) != len(names):  # pragma: no cover - Orbax checked the structure
        raise CheckpointError(f"restore_sharded_checkpoint: {path}: leaves went missing.")
    got = _fingerprints(values)
    bad = [
        f"{name}: fingerprint {fp}, saved {header['manifest'][saved[name][2]][3]}"
        for name, fp in zip(names, got, strict=True)
        if fp != header["manifest"][saved[name][2]][3]
    ]
    if bad:
        raise CheckpointError(
            f"restore_sharded_checkpoint: {path} is corrupted: restored values differ from "
            "the saved ones:\n  " + "\n  ".join(bad)
        )
    return jax.tree_util.tree_unflatten(
        treedef,
        [_restored_like(v, leaf) for v, (_, leaf) in zip(values, target_leaves, strict=True)],
    )


# --- helpers ------------------------------------------------------------------------------


def _check_leaf(name: str, leaf: Any) -> Any:
    """A leaf as it is saved: `jax.Array`s as they are, everything else as NumPy."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"save_sharded_checkpoint: {name} is a typed PRNG key; save "
                "`jax.random.key_data(key)` and rebuild it with `jax.random.wrap_key_data`."
            )
        return leaf
    value = (
        np.asarray(leaf) if isinstance(leaf, (np.ndarray, np.generic, bool, int, float)) else None
    )
    if value is None or value.dtype.hasobject:
        raise TypeError(
            f"save_sharded_checkpoint: {name} is a {type(leaf).__name__}, not an array or scalar."
        )
    return value


def _abstract(name: str, leaf: Any, saved_dtype: str) -> Any:
    """What Orbax restores into: a `ShapeDtypeStruct` with a sharding, or a NumPy array."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise ValueError(
                f"restore_sharded_checkpoint: target leaf {name} is a jax.ShapeDtypeStruct "
                "without a sharding; give it one, e.g. "
                "`jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))`."
            )
        return leaf
    return np.zeros(np.shape(leaf), np.dtype(saved_dtype))


def _restored_like(value: Any, leaf: Any) -> Any:
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return value
    return like_tree(np.asarray(value), leaf)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.exists():
        why = (
            "the save did not finish (its data is there, its manifest is not)"
            if (path / STATE).exists()
            else "it is not a bnjax sharded checkpoint"
        )
        raise CheckpointError(f"restore_sharded_checkpoint: {path} has no {MANIFEST}: {why}.")
    try:
        header = json.loads(file.read_text())
        ok = isinstance(header, dict) and header.get("format") == FORMAT
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"restore_sharded_checkpoint: {file} cannot be decoded; it is truncated or "
            f"corrupted ({e})."
        ) from e
    if not ok:
        raise CheckpointError(
            f"restore_sharded_checkpoint: {path} is not a bnjax sharded checkpoint."
        )
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"restore_sharded_checkpoint: {path} has format version {header.get('version')!r}; "
            f"this bnjax reads version {VERSION}."
        )
    return header


# --- nothing a save or restore starts outlives it ----------------------------------------
# Orbax runs each save and restore in an event loop of its own, which it closes when
# the call returns. A read that fails (truncated or corrupted data) ends the call at
# the first error while the reads of the other arrays are still in flight in
# TensorStore: their tasks stay pending on the closed loop, their completions call
# back into it ("RuntimeError: Event loop is closed", reported as unraisable), their
# errors are never retrieved, and files of the failed call were still being read
# when the caller went on (e.g. repaired them and restored again). Every loop Orbax
# creates during our calls therefore lets its pending tasks finish before it closes.

_DRAIN_TIMEOUT_S = 60.0


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first lets the tasks still pending finish."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            deadline = self.time() + _DRAIN_TIMEOUT_S
            seen: set[asyncio.Task[Any]] = set()
            # Pending tasks may start others while they finish: until none is left.
            while pending := [t for t in asyncio.all_tasks(self) if not t.done()]:
                seen.update(pending)
                left = deadline - self.time()
                if left <= 0:
                    for t in pending:
                        t.cancel()
                    self.run_until_complete(asyncio.wait(pending, timeout=1.0))
                    break
                self.run_until_complete(asyncio.wait(pending, timeout=left))
            for t in seen:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: the failure was already raised
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingLoop()


@contextlib.contextmanager
def _draining_event_loops() -> Iterator[None]:
    """New event loops drain their pending tasks on close, for the duration of a call.

    Only when the default policy is in place (a custom one, e.g. uvloop's, is left
    alone) and where asyncio still has policies (they are deprecated in 3.14).
    """
    if sys.version_info >= (3, 14):  # pragma: no cover - policies deprecated
        yield
        return
    previous = asyncio.get_event_loop_policy()
    if type(previous) is not asyncio.DefaultEventLoopPolicy:
        yield
        return
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _orbax() -> Any:
    return require("orbax.checkpoint", by="bnjax.deploy's sharded checkpoints")


# --- fingerprints -------------------------------------------------------------------------


def _fingerprints(values: list[Any]) -> list[str]:
    """The fingerprint of every leaf: jax.Arrays on device (one jit per mesh), the rest here."""
    out: list[str | None] = [None] * len(values)
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, jax.Array):
            groups.setdefault(_placement(v.sharding), []).append(i)
        else:
            with np.errstate(over="ignore"):  # uint32 arithmetic wraps, on purpose
                out[i] = _hex(_fingerprint(np, np.asarray(v)))
    for placement, idx in groups.items():
        out_sharding = placement if isinstance(placement, jax.sharding.NamedSharding) else None
        fn = _jitted_fingerprints(len(idx), out_sharding)
        sums = np.asarray(fn([values[i] for i in idx]))
        for i, s in zip(idx, sums, strict=True):
            out[i] = _hex(s)
    return out  # type: ignore[return-value]


def _placement(sharding: Any) -> Any:
    """Leaves with equal placement are fingerprinted by one jitted call."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return tuple(sorted(d.id for d in sharding.device_set))


def _jitted_fingerprints(n: int, out_sharding: Any) -> Callable[[list[Any]], Any]:
    """One jitted call over `n` leaves (built per save/restore: no module-level cache)."""
    del n  # the leaves' count is part of the traced structure
    return jax.jit(
        lambda leaves: jnp.stack([_fingerprint(jnp, a) for a in leaves]),
        out_shardings=out_sharding,
    )


def _fingerprint(xp: Any, a: Any) -> Any:
    """`[h1, h2]` (uint32): sums over the words w_i of `a` (position i, row-major).

    h1 = sum(w_i * (2 K1 i + 1)), h2 = sum(mix(w_i) * (2 K2 i + 1)), modulo 2**32.
    """
    u32 = xp.uint32
    w = _words(xp, a)
    if xp is np:
        idx = np.arange(w.size, dtype=np.uint64).astype(np.uint32).reshape(w.shape)
    else:
        idx = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(w.ndim)):
            iota = lax.broadcasted_iota(jnp.uint32, w.shape, d)
            idx = idx + iota * jnp.uint32(stride % 2**32)
            stride *= w.shape[d]
    one = u32(1)
    h1 = xp.sum(w * (idx * u32(_K1) + one), dtype=u32)
    mixed = (w ^ (w >> u32(15))) * u32(_MIX)
    h2 = xp.sum(mixed * (idx * u32(_K2) + one), dtype=u32)
    return xp.stack([h1, h2])


def _words(xp: Any, a: Any) -> Any:
    """The bits of `a` as uint32 words: one per element, two for 8-byte elements."""
    dtype = np.dtype(a.dtype)
    if dtype == np.bool_:
        return a.astype(xp.uint32)
    small = {1: xp.uint8, 2: xp.uint16}.get(dtype.itemsize)
    if xp is np:
        flat = np.ascontiguousarray(a).reshape(-1)
        if small is not None:
            return flat.view(small).astype(np.uint32).reshape(a.shape)
        words = flat.view(np.uint32)
        return words.reshape(a.shape if dtype.itemsize == 4 else (*a.shape, dtype.itemsize // 4))
    if small is not None:
        return lax.bitcast_convert_type(a, small).astype(jnp.uint32)
    return lax.bitcast_convert_type(a, jnp.uint32)


def _hex(sums: Any) -> str:
    return "".join(f"{int(s):08x}" for s in np.asarray(sums).reshape(-1))
