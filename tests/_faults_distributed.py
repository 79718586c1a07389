"""Transactional steps on 8 CPU devices: every replica makes the same skip decision.

Run by `tests/test_training_faults.py::test_eight_devices_one_decision` in a
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (jax fixes its
device count when it starts). Each check trains one good step, then feeds a batch
whose fault sits on ONE device's shard, and asserts that every replica returns its
inputs bit for bit and says it skipped, and that the next good step equals a run
that never saw the bad batch. Run directly to see the outcome of each check:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_faults_distributed.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402
from bnjax import training  # noqa: E402

NDEV, K, BL = 8, 2, 4  # devices, micro-batches, rows per device and micro-batch
OPT = optax.sgd(0.05, momentum=0.9)
HI = jax.lax.Precision.HIGHEST


def _init():
    rng = np.random.default_rng(0)
    bn_p, bn_s = bnjax.init(4)
    params = {
        "dense": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "bn": bn_p,
        "head": jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    return params, {"bn": bn_s}


def _batch(seed, fault=None):
    """(K, NDEV * BL, ...): rows [d * BL, (d + 1) * BL) of each micro-batch are device d's.

    `fault`: "input" puts an inf in device 5's rows (every loss and gradient is then
    NaN, through the synchronized statistics); "local_loss" makes device 3's loss alone
    infinite, through a term without gradient, so that only a shared decision keeps
    the replicas together.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, NDEV * BL, 3)) * [1.0, 3.0, 0.5] + [2.0, -4.0, 10.0]
    t = rng.normal(size=(K, NDEV * BL))
    bad = np.zeros((K, NDEV * BL))
    if fault == "input":
        x[1, 5 * BL + 1, 2] = np.inf
    elif fault == "local_loss":
        bad[1, 3 * BL] = np.inf
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, t, bad))


def _loss(axis_name, global_mean=True):
    def loss_fn(params, stats, batch):
        x, t, bad = batch
        layer = bnjax.batch_norm(momentum=0.1, axis_name=axis_name)
        h = jnp.dot(x, params["dense"], precision=HI)
        y, moments = layer.normalize(params["bn"], stats["bn"], h, True)
        pred = jnp.dot(jnp.tanh(y), params["head"], precision=HI)
        se = jnp.sum((pred - t) ** 2)
        if axis_name is None or not global_mean:
            loss = se / t.shape[0]
        else:  # the global mean over every device's rows
            loss = jax.lax.psum(se, axis_name) / jax.lax.psum(t.shape[0], axis_name)
        loss = loss + jax.lax.stop_gradient(jnp.sum(bad))  # this device's rows only
        new = {"bn": layer.update_stats(stats["bn"], moments)}
        return loss, (new, None, {"bn": layer.report(moments)})

    return loss_fn


def _bits(tree):
    return [np.asarray(a).reshape(-1).view(np.uint8) for a in jax.tree.leaves(tree)]


def _same(a, b, what):
    for x, y in zip(_bits(a), _bits(b), strict=True):
        if not np.array_equal(x, y):
            raise AssertionError(f"{what}: not bit-identical")


def _scenario(step, state, replicas=None):
    """good -> bad (each fault) -> good, against good -> good."""
    state = step(*state, _batch(0))[:3]
    for fault in ("input", "local_loss"):
        out = step(*state, _batch(1, fault))
        skipped = np.asarray(out[3])
        if not skipped.all():
            raise AssertionError(f"{fault}: skipped per replica {skipped.tolist()}")
        if replicas is None:
            _same(out[:3], state, f"{fault}: state after the skipped step")
        else:
            for r in range(replicas):
                _same(jax.tree.map(lambda a, r=r: a[r], out[:3]), state, f"{fault}: replica {r}")
    resumed = step(*state, _batch(2))
    if np.asarray(resumed[3]).any():
        raise AssertionError("a good step was skipped")
    bad = step(*state, _batch(1, "local_loss"))
    after = step(*(bad[:3] if replicas is None else state), _batch(2))
    _same(after[:3], resumed[:3], "the step after a skipped one")


def shard_map_check():
    mesh = jax.make_mesh((NDEV,), ("data",))
    inner = training.make_train_step(
        _loss("data"),
        OPT,
        accum_steps=K,
        stats_policy="full",
        skip_nonfinite=True,
        axis_name="data",
    )

    def local(params, stats, opt_state, batch):
        params, stats, opt_state, metrics = inner(params, stats, opt_state, batch)
        return params, stats, opt_state, metrics.skipped

    step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P(), P(None, "data")),
            out_specs=(P(), P(), P(), P()),
        )
    )
    params, stats = _init()
    _scenario(_on_mesh(mesh, step), (params, stats, OPT.init(params)))


def _pmean_grads(axis_name):
    """Under `pmap` the gradients are each device's own: average them (docs/scaling.md)."""

    def update(updates, state, params=None):
        del params
        return jax.lax.pmean(updates, axis_name), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def pmap_check():
    opt = optax.chain(_pmean_grads("i"), OPT)
    inner = training.make_train_step(
        _loss("i", global_mean=False),
        opt,
        accum_steps=K,
        stats_policy="micro",
        skip_nonfinite=True,
        axis_name="i",
    )

    def local(params, stats, opt_state, batch):
        params, stats, opt_state, metrics = inner(params, stats, opt_state, batch)
        return params, stats, opt_state, metrics.skipped

    mapped = jax.pmap(local, axis_name="i", in_axes=(None, None, None, 0))

    def step(params, stats, opt_state, batch):
        per_device = jax.tree.map(
            lambda a: jnp.moveaxis(a.reshape(K, NDEV, BL, *a.shape[2:]), 1, 0), batch
        )
        return mapped(params, stats, opt_state, per_device)

    params, stats = _init()
    state = (params, stats, opt.init(params))
    good = step(*state, _batch(0))
    for r in range(1, NDEV):  # synchronized: every replica took the same good step
        _same(
            jax.tree.map(lambda a, r=r: a[r], good[:3]),
            jax.tree.map(lambda a: a[0], good[:3]),
            f"replica {r} after a good step",
        )
    state = jax.tree.map(lambda a: a[0], good[:3])
    _scenario(_first_replica(step), state, replicas=None)
    out = step(*state, _batch(1, "local_loss"))
    if not np.asarray(out[3]).all():
        raise AssertionError(f"pmap: skipped per replica {np.asarray(out[3]).tolist()}")
    for r in range(NDEV):
        _same(jax.tree.map(lambda a, r=r: a[r], out[:3]), state, f"pmap replica {r}")


def _first_replica(step):
    """`step` on the replicated state, returning replica 0 (checked equal to all)."""

    def run(*args):
        out = step(*args)
        for r in range(1, NDEV):
            _same(
                jax.tree.map(lambda a, r=r: a[r], out[:3]),
                jax.tree.map(lambda a: a[0], out[:3]),
                f"replica {r}",
            )
        return (*jax.tree.map(lambda a: a[0], out[:3]), np.asarray(out[3]))

    return run


def jit_named_sharding_check():
    mesh = jax.make_mesh((NDEV,), ("data",))
    inner = jax.jit(
        training.make_train_step(
            _loss(None), OPT, accum_steps=K, stats_policy="full", skip_nonfinite=True
        )
    )

    def step(params, stats, opt_state, batch):
        batch = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
        params, stats, opt_state, metrics = inner(params, stats, opt_state, batch)
        return params, stats, opt_state, metrics.skipped

    params, stats = _init()
    state = jax.device_put((params, stats, OPT.init(params)), NamedSharding(mesh, P()))
    _scenario(step, state)


def _on_mesh(mesh, step):
    """`step` with the state replicated and the batch split along its rows."""

    def run(params, stats, opt_state, batch):
        batch = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
        state = jax.device_put((params, stats, opt_state), NamedSharding(mesh, P()))
        return step(*state, batch)

    return run


CHECKS = {
    "shard_map": shard_map_check,
    "pmap": pmap_check,
    "jit_named_sharding": jit_named_sharding_check,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if jax.device_count() != NDEV:
        print(f"needs {NDEV} devices, found {jax.device_count()}", file=sys.stderr)
        return 2
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:  # report every check, not just the first failure
            results[name] = traceback.format_exc(limit=3)
        print(name, results[name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 0 if all(v == "ok" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
