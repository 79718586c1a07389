"""Data-parallel training with synchronized BatchNorm on 8 simulated CPU devices.

The digits CNN of `train_digits.py` (conv-BN-ReLU blocks, channels-last), trained
three ways on the same global batches:

1. one device, the full batch;
2. `jax.shard_map` over a mesh of 8 devices, each holding 1/8 of the batch, with
   `bnjax.apply(..., axis_name="data")`: batch statistics are reduced over all 8
   shards (PyTorch's `SyncBatchNorm`), the loss is the global mean, so every step
   is the single-device step, up to float32 summation order;
3. `jax.jit` with the batch sharded over the mesh (`NamedSharding`) and the model
   code of run 1 unchanged: XLA partitions the reductions itself.

It checks that 2 and 3 end with the parameters and running statistics of 1, and
prints, for contrast, how far local BatchNorm (no `axis_name`: per-device
statistics) drifts. Exits 1 if a synchronized run differs by more than `--atol`.

    python examples/data_parallel.py        # ~25 s on 2 idle CPU cores

On real accelerators drop the `XLA_FLAGS` line: `jax.devices()` are the GPUs/TPUs,
and on several hosts call `jax.distributed.initialize()` first (docs/scaling.md).
"""

from __future__ import annotations

import os

# Simulate 8 devices on the CPU. Must happen before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
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


def max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(lambda u, v: np.max(np.abs(np.asarray(u) - np.asarray(v))), a, b)
    return float(max(jax.tree.leaves(diffs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    # float32 runs that differ only in summation order (8 partial sums + all-reduce vs
    # one reduction) start ~1e-7 apart (relative) and drift slowly over the run: with
    # the defaults (42 Adam steps) we measure ~1e-6 on parameters and statistics. Local
    # BatchNorm, the bug this guards against, is ~1e-2 away. 1e-4 separates the two.
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument(
        "--no-local-bn", action="store_true", help="skip the local-BatchNorm contrast run"
    )
    args = parser.parse_args(argv)

    n_dev = jax.device_count()
    if args.batch_size % n_dev:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of {n_dev} devices")
    mesh = jax.make_mesh((n_dev,), ("data",))
    print(f"{n_dev} devices ({jax.devices()[0].platform}), global batch {args.batch_size}")

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
        jax.block_until_ready(params)
        return params, stats, float(loss), time.perf_counter() - t0

    def on_mesh(a):
        return jax.device_put(a, batch_sharding)

    def replicated(tree):
        return jax.device_put(tree, replicate)

    def single(tree):
        return jax.device_put(tree, jax.devices()[0])

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
    print(f"{len(batches)} steps; max |difference| from the 1-device run after training:")
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
        print(
            f"  {name:24s} params {dp:.2e}  batch_stats {ds:.2e}  "
            f"final loss {loss:.4f}  {seconds:5.1f} s  {verdict}"
        )

    params, stats, _, _ = runs["shard_map + axis_name"]
    logits, _ = jax.jit(forward, static_argnums=3)(params, stats, jnp.asarray(x_test), False)
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_test))
    print(f"test accuracy (data-parallel model, running statistics): {accuracy:.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
