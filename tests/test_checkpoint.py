"""Lossless checkpoints: save -> restore -> continue is bit-identical; bad files raise."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax.deploy import CheckpointError, restore_checkpoint, save_checkpoint

pytest.importorskip("flax", reason="bnjax checkpoints are written with flax.serialization")
# Nothing a save or restore starts may outlive it (issue 24): a late callback into a
# closed event loop is reported as unraisable, which fails the test that caused it.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

STEPS, SPLIT = 6, 3
OPT = optax.adamw(1e-2)  # moments, a step count and weight decay: a non-trivial opt_state


def _init(seed, hidden=8):
    rng = np.random.default_rng(seed)
    bn_p, bn_s = bnjax.init(hidden)
    params = {
        "dense1": {"kernel": jnp.asarray(rng.normal(size=(5, hidden)), jnp.float32)},
        "bn": bn_p,
        "dense2": {"kernel": jnp.asarray(rng.normal(size=(hidden, 3)), jnp.float32)},
    }
    return {
        "params": params,
        "batch_stats": {"bn": bn_s},
        "opt_state": OPT.init(params),
        "step": 0,
    }


def _loss(params, batch_stats, x, y):
    h = x @ params["dense1"]["kernel"]
    h, bn_s = bnjax.apply(params["bn"], batch_stats["bn"], h, True)
    logits = jax.nn.relu(h) @ params["dense2"]["kernel"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"bn": bn_s}


@jax.jit
def _train_step(params, batch_stats, opt_state, x, y):
    (_, batch_stats), grads = jax.value_and_grad(_loss, has_aux=True)(params, batch_stats, x, y)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state


def _data(step):
    rng = np.random.default_rng(100 + step)
    return jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))


def _train(state, steps):
    p, s, o, step = state["params"], state["batch_stats"], state["opt_state"], state["step"]
    for _ in range(steps):
        p, s, o = _train_step(p, s, o, *_data(step))
        step += 1
    return {"params": p, "batch_stats": s, "opt_state": o, "step": step}


def test_resume_is_bit_identical(tmp_path):
    uninterrupted = _train(_init(0), STEPS)

    first = _train(_init(0), SPLIT)
    path = save_checkpoint(tmp_path / "ckpt.msgpack", first)
    # Restore into a template with other values, as a fresh process would build.
    restored = restore_checkpoint(path, _init(seed=1))
    assert restored["step"] == SPLIT and isinstance(restored["step"], int)
    jax.tree.map(np.testing.assert_array_equal, restored, first)
    assert jax.tree.structure(restored) == jax.tree.structure(first)
    resumed = _train(restored, STEPS - SPLIT)

    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.asarray(a).dtype == np.asarray(b).dtype
    assert int(resumed["batch_stats"]["bn"]["num_batches_tracked"]) == STEPS


def test_truncated_and_corrupted_files_raise(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.msgpack", _train(_init(0), 1))
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.msgpack"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        restore_checkpoint(truncated, _init(0))
    # One flipped byte inside an array's bytes still decodes: the digest catches it.
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    corrupted = tmp_path / "corrupted.msgpack"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256 of its payload does not match"):
        restore_checkpoint(corrupted, _init(0))
    not_ours = tmp_path / "other.msgpack"
    not_ours.write_bytes(b"\x81\xa1a\x01")  # msgpack {"a": 1}
    with pytest.raises(CheckpointError, match="not a bnjax checkpoint"):
        restore_checkpoint(not_ours, _init(0))


def test_a_different_model_structure_raises(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.msgpack", _init(0))
    with pytest.raises(
        CheckpointError, match=r"\['params'\]\['bn'\]\['weight'\]: saved shape \(8,\)"
    ):
        restore_checkpoint(path, _init(0, hidden=16))
    other = _init(0)
    other["params"]["dense3"] = {"kernel": jnp.zeros((3, 3))}
    other["opt_state"] = OPT.init(other["params"])
    with pytest.raises(
        CheckpointError, match=r"missing in the checkpoint: \['params'\]\['dense3'\]"
    ):
        restore_checkpoint(path, other)
    fewer = _init(0)
    del fewer["batch_stats"]
    with pytest.raises(CheckpointError, match=r"not in the target: \['batch_stats'\]"):
        restore_checkpoint(path, fewer)
    wrong_dtype = jax.tree.map(lambda a: a, _init(0))
    wrong_dtype["params"]["bn"]["weight"] = jnp.ones(8, jnp.bfloat16)
    with pytest.raises(CheckpointError, match="saved dtype float32, target dtype bfloat16"):
        restore_checkpoint(path, wrong_dtype)


def test_save_refuses_to_overwrite_and_rejects_typed_keys(tmp_path):
    path = save_checkpoint(tmp_path / "a.msgpack", {"step": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, {"step": 2})
    save_checkpoint(path, {"step": 2}, overwrite=True)
    assert restore_checkpoint(path, {"step": 0}) == {"step": 2}
    with pytest.raises(TypeError, match="key_data"):
        save_checkpoint(tmp_path / "k.msgpack", {"key": jax.random.key(0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.msgpack"]  # no temporary left


# --- sharded checkpoints (Orbax): the same guarantees, for states of many processes --------
# The multi-process resume (2 processes write -> 1 restores, and 1 -> 2) is in
# tests/test_multiprocess.py; here: one process, and everything that must fail.

pytest.importorskip("orbax.checkpoint", reason="sharded checkpoints are written with Orbax")

from bnjax._checkpoint import sharded as _sharded_checkpoint  # noqa: E402
from bnjax.deploy import restore_sharded_checkpoint, save_sharded_checkpoint  # noqa: E402


def test_sharded_resume_is_bit_identical(tmp_path):
    uninterrupted = _train(_init(0), STEPS)
    first = _train(_init(0), SPLIT)
    first["epoch_lr"] = np.float32(0.5)  # a NumPy scalar rides along
    path = save_sharded_checkpoint(tmp_path / "ckpt", first)
    assert sorted(p.name for p in path.iterdir()) == ["bnjax.json", "state"]
    restored = restore_sharded_checkpoint(path, _init(seed=1) | {"epoch_lr": np.float32(0)})
    assert restored["step"] == SPLIT and isinstance(restored["step"], int)
    assert isinstance(restored["epoch_lr"], np.float32) and restored["epoch_lr"] == 0.5
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(first), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.asarray(a).dtype == np.asarray(b).dtype
    del restored["epoch_lr"]
    resumed = _train(restored, STEPS - SPLIT)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sharded_restore_takes_target_shardings_and_abstract_leaves(tmp_path):
    path = save_sharded_checkpoint(tmp_path / "ckpt", {"w": jnp.arange(6.0), "n": 3})
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = {"w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=sharding), "n": 0}
    restored = restore_sharded_checkpoint(path, target)
    assert restored["w"].sharding == sharding and restored["n"] == 3
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))
    with pytest.raises(ValueError, match="ShapeDtypeStruct without a sharding"):
        restore_sharded_checkpoint(path, {"w": jax.ShapeDtypeStruct((6,), jnp.float32), "n": 0})


def test_sharded_mismatched_structure_shape_and_dtype_raise(tmp_path):
    path = save_sharded_checkpoint(tmp_path / "ckpt", _init(0))
    with pytest.raises(
        CheckpointError, match=r"\['params'\]\['bn'\]\['weight'\]: saved shape \(8,\)"
    ):
        restore_sharded_checkpoint(path, _init(0, hidden=16))
    fewer = _init(0)
    del fewer["batch_stats"]
    with pytest.raises(CheckpointError, match=r"not in the target: \['batch_stats'\]"):
        restore_sharded_checkpoint(path, fewer)
    # Orbax alone would cast float32 into this bfloat16 target without a word.
    wrong_dtype = _init(0)
    wrong_dtype["params"]["bn"]["weight"] = jnp.ones(8, jnp.bfloat16)
    with pytest.raises(CheckpointError, match="saved dtype float32, target dtype bfloat16"):
        restore_sharded_checkpoint(path, wrong_dtype)


def test_sharded_unfinished_truncated_and_corrupted_checkpoints_raise(tmp_path):
    state = _train(_init(0), 1)
    path = save_sharded_checkpoint(tmp_path / "ckpt", state)
    # The data Orbax reads (its per-process files are merged into state/d at commit).
    data = max((path / "state" / "d").iterdir(), key=lambda f: f.stat().st_size)
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        restore_sharded_checkpoint(path, _init(0))
    flipped = bytearray(blob)  # one flipped byte
    flipped[len(blob) // 2] ^= 0x01
    data.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        restore_sharded_checkpoint(path, _init(0))
    data.write_bytes(blob)
    jax.tree.map(np.testing.assert_array_equal, restore_sharded_checkpoint(path, _init(0)), state)

    # Values that read back with other bits than were saved fail their fingerprint.
    header = json.loads((path / "bnjax.json").read_text())
    entry = next(e for e in header["manifest"] if e[0] == "['params']['bn']['bias']")
    entry[3] = "0" * 16
    (path / "bnjax.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"corrupted: .*\n  \['params'\]\['bn'\]\['bias'\]"):
        restore_sharded_checkpoint(path, _init(0))

    (path / "bnjax.json").write_text('{"format": "bnjax.sharded_checkpoint", "vers')
    with pytest.raises(CheckpointError, match="cannot be decoded"):
        restore_sharded_checkpoint(path, _init(0))
    (path / "bnjax.json").unlink()  # as a save that died before its commit
    with pytest.raises(CheckpointError, match="the save did not finish"):
        restore_sharded_checkpoint(path, _init(0))
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        restore_sharded_checkpoint(tmp_path / "nothing", _init(0))


def test_sharded_save_refuses_to_overwrite_and_rejects_typed_keys(tmp_path):
    path = save_sharded_checkpoint(tmp_path / "a", {"step": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_sharded_checkpoint(path, {"step": 2})
    save_sharded_checkpoint(path, {"step": 2}, overwrite=True)
    assert restore_sharded_checkpoint(path, {"step": 0}) == {"step": 2}
    with pytest.raises(TypeError, match="key_data"):
        save_sharded_checkpoint(tmp_path / "k", {"key": jax.random.key(0)})
    with pytest.raises(TypeError, match="not an array or scalar"):
        save_sharded_checkpoint(tmp_path / "s", {"name": "adam"})


@pytest.mark.parametrize(
    "dtype", [np.float32, jnp.bfloat16, np.float16, np.int8, np.uint16, np.int32, np.bool_]
)
def test_fingerprint_is_the_same_on_device_and_on_host(dtype):
    rng = np.random.default_rng(0)
    value = (rng.normal(size=(3, 5, 2)) * 50).astype(dtype)
    on_host = _sharded_checkpoint._fingerprints([value])
    on_device = _sharded_checkpoint._fingerprints([jnp.asarray(value)])
    assert on_host == on_device


def test_fingerprint_sees_every_single_bit_flip_and_moved_elements():
    value = np.asarray([1.5, -2.0, 3.25, 0.0], np.float32)
    base = _sharded_checkpoint._fingerprints([value])[0]
    words = value.view(np.uint32)
    for i in range(value.size):
        for bit in range(32):
            flipped = words.copy()
            flipped[i] ^= np.uint32(1 << bit)
            assert _sharded_checkpoint._fingerprints([flipped.view(np.float32)])[0] != base
    assert _sharded_checkpoint._fingerprints([value[::-1].copy()])[0] != base
