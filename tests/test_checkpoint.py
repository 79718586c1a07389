"""Lossless checkpoints: save -> restore -> continue is bit-identical; bad files raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax.deploy import CheckpointError, restore_checkpoint, save_checkpoint

pytest.importorskip("flax", reason="bnjax checkpoints are written with flax.serialization")

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
