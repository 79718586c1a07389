"""Data-parallel training with synchronized BatchNorm, on one process or several.

The digits CNN of `train_digits.py` (conv-BN-ReLU blocks, channels-last), trained
three ways on the same global batches:

1. one device, the full batch;
2. `jax.shard_map` over a mesh of all devices, each holding its part of the batch,
   with `bnjax.apply(..., axis_name="data")`: batch statistics are reduced over all
   shards (PyTorch's `SyncBatchNorm`), the loss is the global mean, so every step is
   the single-device step, up to float32 summation order;
3. `jax.jit` with the batch sharded over the mesh (`NamedSharding`) and the model
   code of run 1 unchanged: XLA partitions the reductions itself.

It checks that 2 and 3 end with the parameters and running statistics of 1, and
prints, for contrast, how far local BatchNorm (no `axis_name`: per-device
statistics) drifts. Exits 1 if a synchronized run differs by more than `--atol`.

    python examples/data_parallel.py                  # 1 process, 8 simulated CPU devices
    python examples/data_parallel.py --processes 2    # 2 local processes x 4 devices each

With `--processes N` the script launches N copies of itself on this machine (a free
port on 127.0.0.1 as the coordinator); they form one JAX runtime
(`jax.distributed.initialize`, gloo collectives on CPU) whose mesh spans the devices of
every process. Each process loads only its slice of every global batch and
`jax.make_array_from_process_local_data` assembles the global array; that is how the
same script runs on many hosts. On a cluster, start one copy per host with
`--cluster`: `jax.distributed.initialize()` then finds its peers by itself (Slurm,
Open MPI, Cloud TPU; elsewhere set JAX_COORDINATOR_ADDRESS and pass
`--num-processes`/`--process-id`), and the real accelerators are used (docs/scaling.md).
"""

from __future__ import annotations

import os
import sys

# Simulate 8 devices on the CPU (fewer per process with --processes), except on a real
# cluster. Must happen before jax is imported.
if "--cluster" not in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

# The model and data of the main example (this folder is on sys.path as a script).
import train_digits  # noqa: E402
from train_digits import init_model, load_data  # noqa: E402


def forward(params, batch_stats, x, train: bool, axis_name=None):
    """The model of `train_digits.py`; the only difference between the single-device
    and the data-parallel model is `axis_name`, handed to every `bnjax.apply`."""
    return train_digits.forward(params, batch_stats, x, train, axis_name=axis_name)


def make_single_device_step(optimizer):
    """Runs 1 and 3: one program over the whole batch (sharded or not)."""

    def loss_fn(params, batch_stats, x, y):
        logits, new_stats = forward(params, batch_stats, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_stats

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def make_data_parallel_step(optimizer, mesh, axis_name: str | None = "data"):
    """Run 2: each device runs this on its shard; `axis_name` syncs BatchNorm.

    The loss is the global mean (a `psum` of the shards' sums over the global batch
    size), so its gradient with respect to the replicated parameters is the global
    gradient, identical on every device, and every device applies the same update.
    With `axis_name=None` (local BatchNorm) each device normalizes with its own
    shard's statistics and the running statistics are averaged afterwards (`pmean`),
    the usual pattern for unsynchronized BatchNorm.
    """

    def loss_fn(params, batch_stats, x, y):
        logits, new_stats = forward(params, batch_stats, x, train=True, axis_name=axis_name)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        loss = jax.lax.psum(ce.sum(), "data") / jax.lax.psum(ce.shape[0], "data")
        return loss, new_stats

    def local_step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        if axis_name is None:  # local BN: per-device running stats, averaged here
            batch_stats = jax.lax.pmean(batch_stats, "data")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    replicated, sharded = P(), P("data")
    return jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(replicated, replicated, replicated, sharded, sharded),
            out_specs=(replicated, replicated, replicated, replicated),
        )
    )


def fetch(tree):
    """Every leaf as a NumPy array on this process (gathers arrays of other processes)."""

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, tree)


def max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(lambda u, v: np.max(np.abs(u - v)), fetch(a), fetch(b))
    return float(max(jax.tree.leaves(diffs)))


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its launcher dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup has to do
        pass


def launch_local(processes: int, argv: list[str], timeout: float) -> int:
    """Runs this script in `processes` local processes that form one JAX runtime.

    Each gets `8 // processes` simulated CPU devices and its own process group;
    process 0's output is shown. If one fails, or `timeout` seconds pass, every
    group is killed, and the exit status names the first process that failed.
    """
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(1, 8 // processes)}"
    # JAX's distributed runtime catches SIGTERM (a preemption notice), so a stuck run
    # is killed with SIGKILL below; a SIGTERM to this launcher still cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs = [tempfile.TemporaryFile() for _ in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv, "--coordinator",
             f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)],
            env=env, start_new_session=True,
            stdout=None if i == 0 else logs[i], stderr=None if i == 0 else logs[i],
        )
        for i in range(processes)
    ]
    deadline, failed = time.monotonic() + timeout, None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if time.monotonic() > deadline:
                print(f"launch_local: timed out after {timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(0.1)
        failed = next((i for i, p in enumerate(procs) if p.returncode != 0), failed)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    if failed is not None:
        logs[failed].seek(0)
        err = logs[failed].read().decode(errors="replace")
        print(f"launch_local: process {failed} failed with status {procs[failed].returncode}"
              + (f":\n{err[-3000:]}" if err else ""), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    # float32 runs that differ only in summation order (partial sums + all-reduce vs one
    # reduction) start ~1e-7 apart (relative) and drift slowly over the run: with the
    # defaults (42 Adam steps) we measure at most 3.7e-5 on parameters and statistics
    # (docs/scaling.md, section 7). Local BatchNorm, the bug this guards against, is
    # ~4e-2 away. 1e-4 separates the two.
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument(
        "--no-local-bn", action="store_true", help="skip the local-BatchNorm contrast run"
    )
    parser.add_argument("--processes", type=int, default=1,
                        help="launch this many local processes (one JAX runtime)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="with --processes: seconds before every process is killed")
    parser.add_argument("--cluster", action="store_true",
                        help="call jax.distributed.initialize() with no arguments (Slurm, "
                        "Open MPI, Cloud TPU) and use the real devices")
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)  # set by --processes
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    if args.processes > 1:  # the launcher: N copies of this script, then nothing else
        passed_on, skip = [], False
        for a in argv:  # every argument but --processes N and --timeout T
            if not skip and a.split("=")[0] not in ("--processes", "--timeout"):
                passed_on.append(a)
            skip = not skip and a in ("--processes", "--timeout")
        return launch_local(args.processes, passed_on, args.timeout)
    if args.coordinator is not None:  # one of the local processes
        die_with_parent()
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
            initialization_timeout=120,
        )
    elif args.cluster:
        jax.distributed.initialize()
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)

    n_dev = jax.device_count()
    if args.batch_size % n_dev:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of {n_dev} devices")
    # All devices of all processes, process by process: process p holds the p-th
    # contiguous slice of every global batch.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices), ("data",))
    say(f"{jax.process_count()} process(es) x {jax.local_device_count()} devices "
        f"({devices[0].platform}), global batch {args.batch_size}")

    x_train, x_test, y_train, y_test = load_data(args.seed)
    rng = np.random.default_rng(args.seed)
    steps = len(x_train) // args.batch_size
    batches = [  # the same global batches for every run
        order[s * args.batch_size : (s + 1) * args.batch_size]
        for order in (rng.permutation(len(x_train)) for _ in range(args.epochs))
        for s in range(steps)
    ]

    optimizer = optax.adam(args.lr)
    params0, stats0 = init_model(jax.random.key(args.seed))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicate = NamedSharding(mesh, P())

    def train(step, put_batch, put_state):
        params, stats = put_state(params0), put_state(stats0)
        opt_state = put_state(optimizer.init(params0))
        t0 = time.perf_counter()
        for idx in batches:
            x, y = put_batch(x_train[idx]), put_batch(y_train[idx])
            params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
            if jax.process_count() > 1:  # one step in flight: see docs/scaling.md
                jax.block_until_ready(params)
        jax.block_until_ready(params)
        return params, stats, float(loss), time.perf_counter() - t0

    def on_mesh(a):  # this process's slice of the global batch -> the global array
        per_process = len(a) // jax.process_count()
        mine = a[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
        return jax.make_array_from_process_local_data(batch_sharding, mine, a.shape)

    def replicated(tree):
        return jax.device_put(tree, replicate)

    def single(tree):  # every process runs the 1-device reference on its first device
        return jax.device_put(tree, jax.local_devices()[0])

    runs = {
        "1 device": train(make_single_device_step(optimizer), single, single),
        "shard_map + axis_name": train(
            make_data_parallel_step(optimizer, mesh), on_mesh, replicated
        ),
        "jit + NamedSharding": train(make_single_device_step(optimizer), on_mesh, replicated),
    }
    if not args.no_local_bn:
        runs["local BN (no axis_name)"] = train(
            make_data_parallel_step(optimizer, mesh, axis_name=None), on_mesh, replicated
        )

    ref_params, ref_stats, _, _ = runs["1 device"]
    ok = True
    say(f"{len(batches)} steps; max |difference| from the 1-device run after training:")
    for name, (params, stats, loss, seconds) in runs.items():
        dp = max_abs_diff(params, ref_params) if name != "1 device" else 0.0
        ds = max_abs_diff(stats, ref_stats) if name != "1 device" else 0.0
        if name == "local BN (no axis_name)":
            verdict = "(expected to differ)"
        elif name == "1 device":
            verdict = ""
        else:
            good = dp <= args.atol and ds <= args.atol
            ok &= good
            verdict = "ok" if good else f"FAIL (> {args.atol:g})"
        say(
            f"  {name:24s} params {dp:.2e}  batch_stats {ds:.2e}  "
            f"final loss {loss:.4f}  {seconds:5.1f} s  {verdict}"
        )

    params, stats = fetch(runs["shard_map + axis_name"][:2])
    logits, _ = jax.jit(forward, static_argnums=3)(params, stats, jnp.asarray(x_test), False)
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_test))
    say(f"test accuracy (data-parallel model, running statistics): {accuracy:.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
