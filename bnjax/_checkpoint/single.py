"""Lossless single-file checkpoints of a training state (params, batch_stats, opt_state, step).

Format: one msgpack file written with `flax.serialization` (bit-exact: every array is
stored as its raw bytes with its dtype and shape). It holds a header, a manifest of
every leaf (its key path, shape and dtype) and the SHA-256 of the payload:

    {"format": "bnjax.checkpoint", "version": 1, "manifest": [[path, shape, dtype], ...],
     "sha256": hex digest of payload, "payload": msgpack({"0": leaf0, "1": leaf1, ...})}

Why this and not orbax: a training state of a BatchNorm model is a small pytree saved
from one host; one file written atomically (temporary file, then `os.replace`) is the
simplest thing that cannot be half-written, needs no background threads or directory
layout, and is read back byte for byte. Restoring always goes through a *target*
pytree, and the manifest must match it exactly (same paths, shapes, dtypes): there is
no partial or "best effort" load. A truncated or corrupted file fails to decode or
fails the digest. For states sharded over several processes, `save_sharded_checkpoint`
(`_sharded_checkpoint.py`, Orbax) writes every process's shards with the same guarantees.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnjax._core.extras import require

FORMAT = "bnjax.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be restored: corrupted, truncated, or for another structure."""


def save_checkpoint(path: str | os.PathLike[str], state: Any, *, overwrite: bool = False) -> Path:
    """Saves a pytree (e.g. `{"params", "batch_stats", "opt_state", "step"}`) to one file.

    Every leaf is stored bit for bit with its dtype and shape, with a manifest and a
    SHA-256 digest. The write is atomic: a temporary file in the same folder, then a
    rename, so a crash never leaves a half-written checkpoint under `path`.

    Args:
      path: the file to write (parent folders are created).
      state: a pytree of arrays and Python scalars: dicts, lists, tuples,
        NamedTuples (optax states), `None`.
      overwrite: replace an existing file (default: refuse).

    Returns:
      The path written.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
      TypeError: a leaf is not an array or scalar (e.g. a typed PRNG key: save
        `jax.random.key_data(key)` instead).
      ValueError: a leaf is sharded over devices of other processes (use
        `save_sharded_checkpoint`).
      ImportError: flax is not installed (`pip install bnjax[flax]`).

    Example:
      >>> state = {"params": {"w": jnp.ones(3)}, "step": 7}
      >>> save_checkpoint("/tmp/ckpt.msgpack", state, overwrite=True)
      PosixPath('/tmp/ckpt.msgpack')
    """
    serialization = _flax_serialization("bnjax.deploy.save_checkpoint")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_checkpoint: {path} exists; pass overwrite=True to replace it.")
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    manifest: list[list[Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for i, (key_path, leaf) in enumerate(leaves):
        value = _to_numpy(key_path, leaf)
        manifest.append([jax.tree_util.keystr(key_path), list(value.shape), value.dtype.name])
        arrays[str(i)] = value
    payload = serialization.msgpack_serialize(arrays)
    blob = serialization.msgpack_serialize(
        {
            "format": FORMAT,
            "version": VERSION,
            "manifest": manifest,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": payload,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def restore_checkpoint(path: str | os.PathLike[str], target: Any) -> Any:
    """Restores a checkpoint into the structure of `target`, bit for bit, or raises.

    `target` is a pytree of the same structure as the saved state (e.g. a freshly
    initialized one); only its structure, shapes and dtypes are used. Every saved leaf
    must match a leaf of `target` by key path, shape and dtype, and vice versa.

    Args:
      path: a file written by `save_checkpoint`.
      target: the pytree to restore into.

    Returns:
      A pytree of `target`'s structure holding the saved values: `jax.Array` leaves
      where `target` has them (placed with the target leaf's sharding), NumPy arrays
      for NumPy leaves, Python scalars for Python scalars.

    Raises:
      FileNotFoundError: no file at `path`.
      CheckpointError: (a `ValueError`) the file is truncated or corrupted (it does
        not decode, or its digest does not match), is not a bnjax checkpoint, or
        was saved from a different structure (the message lists the missing,
        unexpected and mismatched paths).

    Example:
      >>> state = {"params": {"w": jnp.ones(3)}, "step": 7}
      >>> _ = save_checkpoint("/tmp/ckpt.msgpack", state, overwrite=True)
      >>> target = {"params": {"w": jnp.zeros(3)}, "step": 0}
      >>> state = restore_checkpoint("/tmp/ckpt.msgpack", target)
      >>> state["step"]
      7
    """
    serialization = _flax_serialization("bnjax.deploy.restore_checkpoint")
    path = Path(path)
    blob = path.read_bytes()
    try:
        outer = serialization.msgpack_restore(blob)
        ok = isinstance(outer, dict) and outer.get("format") == FORMAT
    except Exception as e:
        raise CheckpointError(
            f"restore_checkpoint: {path} ({len(blob)} bytes) cannot be decoded; it is "
            f"truncated or corrupted ({type(e).__name__}: {e})."
        ) from e
    if not ok:
        raise CheckpointError(f"restore_checkpoint: {path} is not a bnjax checkpoint.")
    if outer.get("version") != VERSION:
        raise CheckpointError(
            f"restore_checkpoint: {path} has format version {outer.get('version')!r}; this "
            f"bnjax reads version {VERSION}."
        )
    payload = outer["payload"]
    if hashlib.sha256(payload).hexdigest() != outer["sha256"]:
        raise CheckpointError(
            f"restore_checkpoint: {path} is corrupted: the SHA-256 of its payload does not "
            "match the digest saved with it."
        )

    target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    saved = {p: (tuple(shape), dtype, i) for i, (p, shape, dtype) in enumerate(outer["manifest"])}
    problems = compare_trees(saved, target_leaves)
    if problems:
        raise CheckpointError(
            f"restore_checkpoint: {path} was saved from a different structure than the "
            "target; nothing was restored:\n  " + "\n  ".join(problems)
        )
    try:
        arrays = serialization.msgpack_restore(payload)
    except Exception as e:  # pragma: no cover - the digest matched, so this is unexpected
        raise CheckpointError(f"restore_checkpoint: {path}: payload does not decode: {e}") from e
    values = []
    for key_path, leaf in target_leaves:
        _, _, i = saved[jax.tree_util.keystr(key_path)]
        values.append(like_tree(arrays[str(i)], leaf))
    return jax.tree_util.tree_unflatten(treedef, values)


def compare_trees(saved: dict[str, Any], target_leaves: list[tuple[Any, Any]]) -> list[str]:
    problems = []
    target_paths = set()
    for key_path, leaf in target_leaves:
        name = jax.tree_util.keystr(key_path)
        target_paths.add(name)
        if name not in saved:
            problems.append(f"missing in the checkpoint: {name}")
            continue
        shape, dtype, _ = saved[name]
        want_shape, want_dtype = _shape_dtype(leaf)
        if shape != want_shape:
            problems.append(f"{name}: saved shape {shape}, target shape {want_shape}")
        elif not _dtype_matches(dtype, want_dtype):
            problems.append(f"{name}: saved dtype {dtype}, target dtype {want_dtype}")
    problems += [f"not in the target: {p}" for p in saved if p not in target_paths]
    return problems


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(leaf, bool):
        return (), "bool"
    if isinstance(leaf, int):
        return (), "int"
    if isinstance(leaf, float):
        return (), "float"
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return tuple(shape), np.dtype(leaf.dtype).name


def _dtype_matches(saved: str, target: str) -> bool:
    if target in ("int", "float", "bool"):  # Python scalars: any width of that kind
        kind = {"int": "iu", "float": "f", "bool": "b"}[target]
        return np.dtype(saved).kind in kind
    return saved == target


def _to_numpy(key_path: Any, leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"save_checkpoint: {jax.tree_util.keystr(key_path)} is a typed PRNG key; save "
            "`jax.random.key_data(key)` and rebuild it with `jax.random.wrap_key_data`."
        )
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError(
            f"save_checkpoint: {jax.tree_util.keystr(key_path)} is sharded over devices of "
            "other processes, so this process cannot write it to one file; save the state "
            "from every process with `bnjax.deploy.save_sharded_checkpoint` instead."
        )
    try:
        value = np.asarray(jax.device_get(leaf))
    except Exception as e:
        raise TypeError(
            f"save_checkpoint: {jax.tree_util.keystr(key_path)} is a "
            f"{type(leaf).__name__}, not an array or scalar."
        ) from e
    if value.dtype.hasobject:
        raise TypeError(
            f"save_checkpoint: {jax.tree_util.keystr(key_path)} is a "
            f"{type(leaf).__name__}, not an array or scalar."
        )
    return value


def like_tree(value: np.ndarray, leaf: Any) -> Any:
    if isinstance(leaf, (bool, int, float)):
        return type(leaf)(value.item())
    if isinstance(leaf, jax.Array):
        return jax.device_put(value, leaf.sharding)
    if isinstance(leaf, np.generic):
        return value[()]
    return value


def _flax_serialization(by: str) -> Any:
    """`flax.serialization`, or the one missing-extra message naming `by`."""
    return require("flax.serialization", by=by)
