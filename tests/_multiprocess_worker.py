"""One process of a multi-process JAX run, launched by `tests/test_multiprocess.py`.

Each of N processes runs this file with its process id and the coordinator's
address; together they form one JAX runtime (`jax.distributed.initialize`, gloo
collectives on CPU) whose devices are every process's simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_multiprocess_worker.py \\
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 --out DIR --scenario checks

Process 0 writes what every check computed (gathered to full arrays) to
`DIR/results.npz`; the test compares it with one process on the full batch and with
the float64 reference. Every process writes `DIR/joined.<id>` once it has joined
the runtime and `DIR/done.<id>` when it finished, so that the launcher can say which
process never joined or never finished.

The data, the model and the single-process computations live here too (importable
without side effects): the test imports them to compute the one-process truth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax.deploy import restore_sharded_checkpoint, save_sharded_checkpoint
from bnjax.training import make_train_step

# --- data shared by every process and by the one-process truth ---------------------------

C = 4  # features of the BatchNorm checks
B = 32  # global batch of the BatchNorm checks: 16 rows per process, 4 per device
_rng = np.random.default_rng(0)
X = (_rng.normal(size=(B, 3, C)) * _rng.uniform(0.5, 3.0, C) + _rng.normal(0, 5, C)).astype(
    np.float32
)
G = _rng.normal(size=X.shape).astype(np.float32)  # fixed cotangent: loss = sum(y * G)
PARAMS = {
    "weight": _rng.uniform(0.5, 1.5, C).astype(np.float32),
    "bias": _rng.normal(size=C).astype(np.float32),
}
STATS = {
    "running_mean": _rng.normal(size=C).astype(np.float32),
    "running_var": _rng.uniform(0.5, 2.0, C).astype(np.float32),
    "num_batches_tracked": np.asarray(3, np.int32),
}
# Unequal hosts: host 0 has 13 valid rows (one with a hole), host 1 has 5 (its devices
# hold 4, 1, 0 and 0 of them). Padding holds garbage, as real padding may.
MASK = np.zeros((B, 3), bool)
MASK[:13] = True
MASK[16:21] = True
MASK[2, 1] = False
X_PADDED = np.where(MASK[..., None], X, np.float32(1e4))
MASK_COUNT = int(MASK.sum())  # 53

# A small model trained with `make_train_step`: dense -> BN -> relu -> dense.
F, H, K = 5, 8, 3
STEPS, ACCUM, MICRO = 4, 2, 16  # 4 optimizer steps of 2 micro-batches of 16
TRAIN_X = _rng.normal(size=(STEPS, ACCUM, MICRO, F)).astype(np.float32) * 2 + 1
TRAIN_Y = _rng.integers(0, K, size=(STEPS, ACCUM, MICRO)).astype(np.int32)
OPTIMIZER = optax.adam(1e-2)
CKPT_STEP = 2  # the training state after this many steps is checkpointed


def init_model():
    """Parameters and statistics of the small model (fixed values)."""
    rng = np.random.default_rng(1)
    bn_p, bn_s = bnjax.init(H)
    params = {
        "dense1": {"kernel": jnp.asarray(rng.normal(size=(F, H)) / np.sqrt(F), jnp.float32)},
        "bn": bn_p,
        "dense2": {"kernel": jnp.asarray(rng.normal(size=(H, K)) / np.sqrt(H), jnp.float32)},
    }
    return params, {"bn": bn_s}


def make_loss_fn(axis_name=None):
    """`loss_fn(params, batch_stats, micro_batch)` for `make_train_step` ("micro").

    With `axis_name` (per-device code under `shard_map`) BatchNorm is synchronized
    over it and the loss is the global mean: the sum over all shards divided by the
    global micro-batch size.
    """

    def loss_fn(params, batch_stats, micro_batch):
        x, y = micro_batch
        h = x @ params["dense1"]["kernel"]
        h, bn_s = bnjax.apply(params["bn"], batch_stats["bn"], h, True, axis_name=axis_name)
        logits = jax.nn.relu(h) @ params["dense2"]["kernel"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        if axis_name is None:
            loss = ce.mean()
        else:
            loss = jax.lax.psum(ce.sum(), axis_name) / jax.lax.psum(ce.shape[0], axis_name)
        return loss, ({"bn": bn_s}, None)

    return loss_fn


def bn_loss_and_grads(params, batch_stats, x, g, mask=None):
    """Training-mode BatchNorm, loss = sum(y * g): y, new stats, d params, d x."""

    def loss(params, x):
        y, new_stats = bnjax.apply(params, batch_stats, x, True, mask=mask)
        return jnp.sum(jnp.where(mask[..., None], y, 0) * g if mask is not None else y * g), (
            y,
            new_stats,
        )

    (_, (y, new_stats)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return y, new_stats, gp, gx


def train_one_process(steps=STEPS, state=None, first=0):
    """The one-process truth: `make_train_step` on the full batches, one device."""
    step = jax.jit(make_train_step(make_loss_fn(), OPTIMIZER, accum_steps=ACCUM))
    if state is None:
        params, stats = init_model()
        state = {"params": params, "batch_stats": stats, "opt_state": OPTIMIZER.init(params)}
        state["step"] = 0
    p, s, o = state["params"], state["batch_stats"], state["opt_state"]
    for i in range(first, first + steps):
        p, s, o, _ = step(p, s, o, (TRAIN_X[i], TRAIN_Y[i]))
    return {"params": p, "batch_stats": s, "opt_state": o, "step": first + steps}


# --- helpers for the multi-process side --------------------------------------------------


def global_devices():
    """All devices, ordered by process then id: process p owns mesh rows p*L..p*L+L-1."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def fetch(tree):
    """Every leaf as a full NumPy array on this process (gathers sharded arrays)."""
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, tree)


def local_rows(a, axis=0):
    """This process's contiguous part of a global NumPy array along `axis`."""
    n = a.shape[axis] // jax.process_count()
    p = jax.process_index()
    return np.take(a, np.arange(p * n, (p + 1) * n), axis=axis)


def global_array(mesh, spec, a, axis=0):
    """The global array `a`, assembled from each process's rows (the multi-host way)."""
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, spec), local_rows(a, axis), a.shape
    )


def place(state, mesh, spec_fn, zeros=True):
    """`state`'s arrays placed by `spec_fn(leaf)`; with `zeros`, a restore target."""
    def one(a):
        return jax.device_put(jnp.zeros_like(a) if zeros else a, NamedSharding(mesh, spec_fn(a)))

    arrays = {k: jax.tree.map(one, v) for k, v in state.items() if k != "step"}
    return arrays | {"step": 0 if zeros else state["step"]}


def split_spec(a):
    """Shards the last axis of 2-D leaves over all devices (a sharded state to save)."""
    if np.ndim(a) == 2 and np.shape(a)[-1] % jax.device_count() == 0:
        return P(None, "data")
    return P()


def collectives(hlo_text):
    """`(op, bytes)` of every cross-device collective in a compiled HLO module."""
    import re

    itemsize = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "pred": 1, "f64": 8}
    found = []
    for line in hlo_text.splitlines():
        m = re.search(r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|"
                      r"all-to-all|collective-permute)(-start)?\(", line)
        if not m:
            continue
        nbytes = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            nbytes += n * itemsize.get(dtype, 4)
        found.append((m.group(2), nbytes))
    return found


def deep_params(layers):
    """`layers` x (dense -> BatchNorm -> relu): F -> H -> ... -> H features."""
    params, stats = {}, {}
    for i in range(layers):
        bn_p, bn_s = bnjax.init(H)
        params[f"l{i}"] = {"kernel": jnp.ones((F if i == 0 else H, H)), "bn": bn_p}
        stats[f"l{i}"] = bn_s
    return params, stats


def deep_grads(params, batch_stats, x, g, axis_name=None):
    """Loss sum(out * g) (global under `axis_name`), its gradients, the new stats."""

    def loss(params):
        h, new = x, {}
        for name in sorted(params):
            h = h @ params[name]["kernel"]
            h, new[name] = bnjax.apply(params[name]["bn"], batch_stats[name], h, True,
                                       axis_name=axis_name)
            h = jax.nn.relu(h)
        total = jnp.sum(h * g)
        return (total if axis_name is None else jax.lax.psum(total, axis_name)), new

    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, new


def compiled_steps(mesh, layers, rows_per_device=4):
    """Compiled HLO text of `deep_grads` on `mesh`: path A (jit) and path B (shard_map)."""
    params, stats = deep_params(layers)
    n = rows_per_device * mesh.size
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                            (params, stats))
    x = jax.ShapeDtypeStruct((n, F), jnp.float32, sharding=shard)
    g = jax.ShapeDtypeStruct((n, H), jnp.float32, sharding=shard)
    path_a = jax.jit(deep_grads)
    path_b = jax.jit(jax.shard_map(lambda p, s, x, g: deep_grads(p, s, x, g, "data"), mesh=mesh,
                                   in_specs=(P(), P(), P("data"), P("data")), out_specs=P()))
    return {tag: fn.lower(*abstract, x, g).compile().as_text()
            for tag, fn in (("A", path_a), ("B", path_b))}


# --- the checks ---------------------------------------------------------------------------


def run_checks(out: Path) -> None:
    """Every multi-process computation; process 0 saves the gathered results."""
    ndev = jax.device_count()
    devices = global_devices()
    mesh = Mesh(np.array(devices), ("data",))
    res: dict[str, np.ndarray] = {}
    params, stats = jax.device_put((PARAMS, STATS), NamedSharding(mesh, P()))

    # The global batch, assembled from each process's 16 rows.
    x = global_array(mesh, P("data"), X)
    g = global_array(mesh, P("data"), G)
    res["assembled_x"] = fetch(x)

    # Path A: jit, a batch-sharded global array, no axis_name.
    y, s, gp, gx = fetch(jax.jit(bn_loss_and_grads)(params, stats, x, g))
    _put(res, "A", y=y, stats=s, gp=gp, gx=gx)

    # Path B: shard_map, axis_name over all devices of all processes.
    def local(params, batch_stats, x, g):
        def loss(params, x):
            y, new = bnjax.apply(params, batch_stats, x, True, axis_name="data")
            return jnp.sum(y * g), (y, new)

        (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return y, new, gp, gx

    path_b = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                   out_specs=(P("data"), P(), P(), P("data"))))
    y, s, gp, gx = fetch(path_b(params, stats, x, g))
    _put(res, "B", y=y, stats=s, gp=gp, gx=gx)

    # Statistics within each host only, and across hosts, on a (hosts, devices) mesh.
    mesh2 = Mesh(np.array(devices).reshape(jax.process_count(), -1), ("host", "dev"))
    x2 = global_array(mesh2, P(("host", "dev")), X)
    for tag, axis_name in (("host_local", "dev"), ("all_hosts", ("host", "dev"))):

        def grouped(params, batch_stats, x, axis_name=axis_name):
            y, new = bnjax.apply(params, batch_stats, x, True, axis_name=axis_name)
            return y, jax.tree.map(lambda v: v[None], new)

        fn = jax.jit(jax.shard_map(grouped, mesh=mesh2, in_specs=(P(), P(), P(("host", "dev"))),
                                   out_specs=(P(("host", "dev")), P("host"))))
        y, s = fetch(fn(*jax.device_put((PARAMS, STATS), NamedSharding(mesh2, P())), x2))
        _put(res, tag, y=y, stats=s)

    # Unequal hosts via mask (13 and 5 valid rows): path A and path B, exact counts.
    xm, gm = global_array(mesh, P("data"), X_PADDED), global_array(mesh, P("data"), G)
    mm = global_array(mesh, P("data"), MASK)
    y, s, gp, gx = fetch(jax.jit(bn_loss_and_grads)(params, stats, xm, gm, mm))
    _put(res, "mask_A", y=y, stats=s, gp=gp, gx=gx)

    def local_masked(params, batch_stats, x, g, mask):
        def loss(params, x):
            y, new = bnjax.apply(params, batch_stats, x, True, axis_name="data", mask=mask)
            return jnp.sum(jnp.where(mask[..., None], y, 0) * g), (y, new)

        (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        count = bnjax.batch_moments(x, mask=mask, axis_name="data").count
        return y, new, gp, gx, count

    fn = jax.jit(jax.shard_map(local_masked, mesh=mesh,
                               in_specs=(P(), P(), P("data"), P("data"), P("data")),
                               out_specs=(P("data"), P(), P(), P("data"), P())))
    y, s, gp, gx, count = fetch(fn(params, stats, xm, gm, mm))
    _put(res, "mask_B", y=y, stats=s, gp=gp, gx=gx, count=count)

    # make_train_step with accumulation: path A (jit) and path B (shard_map).
    batches = [
        (global_array(mesh, P(None, "data"), TRAIN_X[i], axis=1),
         global_array(mesh, P(None, "data"), TRAIN_Y[i], axis=1))
        for i in range(STEPS)
    ]
    p0, s0 = jax.device_put(init_model(), NamedSharding(mesh, P()))
    o0 = jax.device_put(OPTIMIZER.init(p0), NamedSharding(mesh, P()))
    step_a = jax.jit(make_train_step(make_loss_fn(), OPTIMIZER, accum_steps=ACCUM))
    step_b = jax.jit(jax.shard_map(
        make_train_step(make_loss_fn("data"), OPTIMIZER, accum_steps=ACCUM), mesh=mesh,
        in_specs=(P(), P(), P(), P(None, "data")), out_specs=P()))
    states_a = []
    for tag, step in (("train_A", step_a), ("train_B", step_b)):
        p, s, o = p0, s0, o0
        losses = []
        for i, batch in enumerate(batches):
            p, s, o, metrics = step(p, s, o, batch)
            losses.append(fetch(metrics.loss))
            if tag == "train_A":
                states_a.append({"params": p, "batch_stats": s, "opt_state": o, "step": i + 1})
        _put(res, tag, state=fetch({"params": p, "batch_stats": s, "opt_state": o}),
             loss=np.stack(losses))

    # Checkpoints. 2 processes write the state after CKPT_STEP steps, with some leaves
    # sharded over all 8 devices; restored here on another mesh, it is bit-identical,
    # and resuming from it on the original layout ends bit-identical to the
    # uninterrupted run. The test restores it on 1 process.
    saved = states_a[CKPT_STEP - 1]
    save_sharded_checkpoint(out / "ckpt_2p", place(saved, mesh, split_spec, zeros=False))
    _put(res, "ckpt_2p_saved", state=fetch(saved))
    on_mesh2 = place(saved, mesh2, lambda a: P(None, "dev") if np.shape(a) == (F, H) else P())
    state = restore_sharded_checkpoint(out / "ckpt_2p", on_mesh2)
    _put(res, "ckpt_2p_on_host_mesh", state=fetch(state))
    state = restore_sharded_checkpoint(out / "ckpt_2p", place(saved, mesh, lambda a: P()))
    p, s, o = state["params"], state["batch_stats"], state["opt_state"]
    for batch in batches[state["step"]:]:
        p, s, o, _ = step_a(p, s, o, batch)
    final = states_a[-1]
    res["resume_2p_bit_identical"] = np.asarray(all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fetch((p, s, o))),
                                             jax.tree.leaves(fetch((final["params"],
                                                                    final["batch_stats"],
                                                                    final["opt_state"]))),
                                             strict=True)))

    # 1 process wrote ckpt_1p (the test, on one device); restore it here, sharded
    # over 2 processes, and resume training on them.
    if (out / "ckpt_1p").exists():
        state = restore_sharded_checkpoint(out / "ckpt_1p", place(saved, mesh, split_spec))
        _put(res, "ckpt_1p_restored", state=fetch(state))
        replicated = jax.device_put((state["params"], state["batch_stats"], state["opt_state"]),
                                    NamedSharding(mesh, P()))
        p, s, o = replicated
        for batch in batches[state["step"]:]:
            p, s, o, _ = step_a(p, s, o, batch)
        _put(res, "resume_1to2", state=fetch({"params": p, "batch_stats": s, "opt_state": o}))

    # The collectives of a compiled forward + backward pass with 1 and 2 BatchNorms.
    for layers in (1, 2):
        for tag, hlo in compiled_steps(mesh, layers).items():
            found = collectives(hlo)
            res[f"hlo/{tag}{layers}/ops"] = np.array([op for op, _ in found], dtype="U32")
            res[f"hlo/{tag}{layers}/bytes"] = np.array([n for _, n in found], np.int64)

    res["ndev"] = np.asarray(ndev)
    if jax.process_index() == 0:
        np.savez(out / "results.npz", **res)


def _put(res, tag, **values):
    for key, value in values.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            res[f"{tag}/{key}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)


# --- entry point --------------------------------------------------------------------------


def die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the launcher dies, however it dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="checks",
                        choices=["checks", "die", "never_join", "ping"])
    parser.add_argument("--init-timeout", type=int, default=60)
    args = parser.parse_args(argv)
    pid = args.process_id
    die_with_parent()

    if args.scenario == "never_join" and pid == args.num_processes - 1:
        print(f"process {pid} (pid {os.getpid()}): never joining", flush=True)
        time.sleep(3600)  # a process that never joins: the launcher must kill it
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator,
        num_processes=args.num_processes,
        process_id=pid,
        initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )
    (args.out / f"joined.{pid}").write_text(str(os.getpid()))
    if args.scenario == "die" and pid == args.num_processes - 1:
        print(f"process {pid}: dying on purpose", file=sys.stderr, flush=True)
        os._exit(3)
    try:
        if args.scenario == "checks":
            run_checks(args.out)
        else:  # "ping", and the survivors of "die": one collective over all processes
            mesh = Mesh(np.array(global_devices()), ("data",))
            x = global_array(mesh, P("data"), np.arange(8 * jax.device_count(), dtype=np.float32))
            fetch(jax.jit(jnp.sum)(x))
    except Exception:
        traceback.print_exc()
        return 1
    (args.out / f"done.{pid}").write_text("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
