"""What Batch Renormalization and ghost batches buy under gradient accumulation.

The digits CNN of `examples/train_digits.py` (conv-BN-relu x2, pool, dense; sklearn's
bundled 8x8 digits, no download) trained with Adam for the same number of optimizer
steps on the same effective batch of 64, in two settings:

- micro-batch 16, k = 4 micro-batches per step;
- micro-batch 4, k = 16 (the hard case: BatchNorm normalizes 4 images at a time).

For each, five ways to train:

| method          | what normalizes in training                                       |
|-----------------|-------------------------------------------------------------------|
| `big batch`     | one batch of 64, plain BN (the reference: no accumulation)        |
| `accum BN`      | k micro-batches (`make_train_step`, "micro" policy), plain BN      |
| `accum renorm`  | the same with `bnjax.Renorm(momentum=0.1)`, rmax 1 -> 3, dmax     |
|                 | 0 -> 5 ramped (`ramp`), values passed each step (`loss_args`)     |
| `ghost`         | one batch of 64 with `virtual_batch_size` = micro-batch: the same |
|                 | normalization as `accum BN`, in one pass                          |
| `ghost renorm`  | `ghost` with the same renorm ramp                                 |

Reported (test split, 450 images, mean over seeds): eval-mode accuracy (running
statistics), train-mode accuracy (each model normalizing test batches the way it was
trained: batches of 64, or of the micro-batch size, with its renorm correction), and
the train/eval gap: mean |train-mode logits - eval-mode logits| / mean |eval-mode
logits|.

    python benchmarks/accumulation_small_batches.py --out benchmarks/accumulation_small_batches.md

Runs in a few minutes on 2 CPU cores (epochs and seeds: see --help).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import bnjax  # noqa: E402
from bnjax import training  # noqa: E402

from train_digits import CHANNELS, init_model, load_data  # noqa: E402

EFFECTIVE_BATCH = 64
SETTINGS = ((16, 4), (4, 16))  # (micro-batch, k)
# The renorm statistics' momentum: the running statistics' 0.1 (Keras's default 0.01,
# i.e. renorm_momentum=0.99, is meant for runs of 100k steps, not 200).
RENORM_MOMENTUM = 0.1
METHODS = ("big batch", "accum BN", "accum renorm", "ghost", "ghost renorm")


def forward(params, batch_stats, x, train, *, renorm=None, vbs=None):
    """train_digits' CNN with the BatchNorm options threaded through."""
    new_stats = {}
    for i in range(len(CHANNELS)):
        block = params[f"block{i}"]
        x = jax.lax.conv_general_dilated(
            x, block["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x, stats = bnjax.apply(
            block["bn"],
            batch_stats[f"block{i}"]["bn"],
            x,
            train,
            renorm=renorm,
            virtual_batch_size=vbs if train else None,
        )
        new_stats[f"block{i}"] = {"bn": stats}
        x = jax.nn.relu(x)
        if i == 0:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.mean(axis=(1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"], new_stats


def with_renorm_stats(batch_stats):
    return jax.tree.map(
        lambda s: {**s, **bnjax.init(s["running_mean"].shape, renorm=True)[1]},
        batch_stats,
        is_leaf=lambda n: isinstance(n, dict) and "running_mean" in n,
    )


def ramp(step, total):
    """The paper's schedule, compressed to this run: plain BN (rmax 1, dmax 0) for the
    first 20% of the steps while the renorm statistics warm up, then rmax 1 -> 3 and
    dmax 0 -> 5 linearly until half-way, then constant."""
    t = min(max((step - 0.2 * total) / (0.3 * total), 0.0), 1.0)
    return 1.0 + 2.0 * t, 5.0 * t


def train(method, micro, k, seed, epochs, data):
    x_train, x_test, y_train, y_test = data
    use_renorm = "renorm" in method
    vbs = micro if method.startswith("ghost") else None
    accum = method.startswith("accum")
    params, batch_stats = init_model(jax.random.key(seed))
    if use_renorm:
        batch_stats = with_renorm_stats(batch_stats)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch_stats, batch, rmax, dmax):
        x, y = batch
        renorm = (
            bnjax.Renorm(rmax=rmax, dmax=dmax, momentum=RENORM_MOMENTUM) if use_renorm else None
        )
        logits, new = forward(params, batch_stats, x, True, renorm=renorm, vbs=vbs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (new, None)

    step = training.make_train_step(loss_fn, optimizer, accum_steps=k if accum else 1)

    @jax.jit
    def train_step(params, batch_stats, opt_state, batch, rmax, dmax):
        batch = training.split_micro_batches(batch, k if accum else 1)
        params, batch_stats, opt_state, _ = step(params, batch_stats, opt_state, batch, rmax, dmax)
        return params, batch_stats, opt_state

    rng = np.random.default_rng(seed)
    steps_per_epoch = len(x_train) // EFFECTIVE_BATCH
    total = epochs * steps_per_epoch
    for s in range(total):
        if s % steps_per_epoch == 0:
            order = rng.permutation(len(x_train))
        idx = order[(s % steps_per_epoch) * EFFECTIVE_BATCH :][:EFFECTIVE_BATCH]
        rmax, dmax = ramp(s, total)
        batch = (jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
        params, batch_stats, opt_state = train_step(
            params, batch_stats, opt_state, batch, jnp.float32(rmax), jnp.float32(dmax)
        )

    # Evaluate: eval mode, and train mode on test batches normalized as in training.
    renorm = bnjax.Renorm(rmax=3.0, dmax=5.0, momentum=RENORM_MOMENTUM) if use_renorm else None
    eval_logits, _ = jax.jit(lambda p, s, x: forward(p, s, x, False, renorm=renorm))(
        params, batch_stats, jnp.asarray(x_test)
    )
    norm_batch = micro if accum else EFFECTIVE_BATCH
    n = len(x_test) // EFFECTIVE_BATCH * EFFECTIVE_BATCH  # whole batches of 64
    train_fn = jax.jit(lambda p, s, x: forward(p, s, x, True, renorm=renorm, vbs=vbs)[0])
    train_logits = jnp.concatenate(
        [
            train_fn(params, batch_stats, jnp.asarray(x_test[i : i + norm_batch]))
            for i in range(0, n, norm_batch)
        ]
    )
    eval_acc = float(np.mean(np.argmax(eval_logits, -1) == y_test))
    train_acc = float(np.mean(np.argmax(train_logits, -1) == y_test[:n]))
    gap = float(jnp.mean(jnp.abs(train_logits - eval_logits[:n])) / jnp.mean(jnp.abs(eval_logits)))
    return eval_acc, train_acc, gap


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    data = load_data(0)
    start = time.perf_counter()
    lines = [
        "| micro-batch x k | method | eval acc | train-mode acc | train/eval logit gap |",
        "|---|---|---|---|---|",
    ]
    for micro, k in SETTINGS:
        for method in METHODS:
            runs = [train(method, micro, k, seed, args.epochs, data) for seed in range(args.seeds)]
            ev, tr, gap = np.mean(runs, axis=0)
            line = f"| {micro} x {k} | {method} | {ev:.3f} | {tr:.3f} | {gap:.3f} |"
            lines.append(line)
            print(line, flush=True)
    elapsed = time.perf_counter() - start
    footer = (
        f"\n{args.epochs} epochs x {len(data[0]) // EFFECTIVE_BATCH} steps of 64, Adam 3e-3, "
        f"seeds 0..{args.seeds - 1} (mean), jax {jax.__version__}, {jax.default_backend()}, "
        f"{platform.machine()}, {elapsed:.0f} s.\n"
        f"Command: python benchmarks/accumulation_small_batches.py --epochs {args.epochs} "
        f"--seeds {args.seeds}" + (f" --out {args.out}" if args.out else "") + "\n"
    )
    print(footer)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n" + footer)


if __name__ == "__main__":
    main()
