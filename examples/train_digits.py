"""Train a small CNN with bnjax on scikit-learn's bundled digits (no download).

Conv-BN-ReLU blocks, channels-last, BatchNorm state threaded explicitly through a
jitted train step: `batch_stats` goes in, the updated `batch_stats` comes out.
Evaluation uses `train=False`, i.e. the running statistics, as PyTorch's `eval()`.

    python examples/train_digits.py            # ~10-20 s on 2 CPU cores
    python examples/train_digits.py --accum-steps 4 --stats-policy full   # 4 micro-batches
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import bnjax

CHANNELS = (16, 32)


def init_model(key: jax.Array, num_classes: int = 10):
    """Parameters and BatchNorm statistics of conv(3x3)-BN-ReLU x2, pool, dense."""
    params, batch_stats = {}, {}
    c_in = 1
    keys = jax.random.split(key, len(CHANNELS) + 1)
    for i, c_out in enumerate(CHANNELS):
        fan_in = 3 * 3 * c_in
        kernel = jax.random.normal(keys[i], (3, 3, c_in, c_out)) * jnp.sqrt(2.0 / fan_in)
        bn_params, bn_stats = bnjax.init(c_out)
        params[f"block{i}"] = {"conv": kernel, "bn": bn_params}
        batch_stats[f"block{i}"] = {"bn": bn_stats}
        c_in = c_out
    w = jax.random.normal(keys[-1], (c_in, num_classes)) * jnp.sqrt(1.0 / c_in)
    params["head"] = {"kernel": w, "bias": jnp.zeros(num_classes)}
    return params, batch_stats


def forward(params, batch_stats, x, train: bool, axis_name=None):
    """Logits for NHWC images, and the updated BatchNorm statistics.

    `axis_name` (used by `data_parallel.py`) synchronizes BatchNorm over a named axis.
    """
    logits, new_stats, _ = forward_with_reports(params, batch_stats, x, train, axis_name)
    return logits, new_stats


def forward_with_reports(params, batch_stats, x, train: bool, axis_name=None):
    """`forward`, plus each BatchNorm's report (its momentum and batch moments), which
    `make_train_step`'s "corrected" and "full" statistics policies read."""
    bn = bnjax.batch_norm(axis_name=axis_name)  # PyTorch's defaults: momentum 0.1, eps 1e-5
    new_stats, reports = {}, {}
    for i in range(len(CHANNELS)):
        block = params[f"block{i}"]
        x = jax.lax.conv_general_dilated(
            x, block["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        stats = batch_stats[f"block{i}"]["bn"]
        x, moments = bn.normalize(block["bn"], stats, x, train)
        new_stats[f"block{i}"] = {"bn": bn.update_stats(stats, moments)}
        reports[f"block{i}"] = {"bn": bn.report(moments)}
        x = jax.nn.relu(x)
        if i == 0:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.mean(axis=(1, 2))
    logits = x @ params["head"]["kernel"] + params["head"]["bias"]
    return logits, new_stats, reports


def loss_fn(params, batch_stats, batch):
    """Cross-entropy; returns `(loss, (new_batch_stats, logits, reports))`."""
    x, y = batch
    logits, new_stats, reports = forward_with_reports(params, batch_stats, x, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (new_stats, logits, reports)


def load_data(seed: int):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1), NHWC
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--accum-steps",
        type=int,
        default=1,
        help="split each batch into this many micro-batches, accumulated under one "
        "lax.scan by bnjax.training.make_train_step (one optimizer update per batch)",
    )
    parser.add_argument(
        "--stats-policy",
        choices=("micro", "corrected", "full"),
        default="micro",
        help="how BatchNorm running statistics treat micro-batches (docs/accumulation.md)",
    )
    args = parser.parse_args(argv)
    if args.batch_size % args.accum_steps:
        parser.error("--batch-size must be divisible by --accum-steps")

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    params, batch_stats = init_model(jax.random.key(args.seed))
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, _, _)), grads = grad_fn(params, batch_stats, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    if args.accum_steps > 1:
        from bnjax import training

        step = training.make_train_step(
            loss_fn,
            optimizer,
            accum_steps=args.accum_steps,
            stats_policy=args.stats_policy,
            # XLA:CPU runs conv kernel-gradients slowly inside loops (jax-ml/jax#12868).
            unroll=jax.default_backend() == "cpu",
        )

        @jax.jit
        def train_step(params, batch_stats, opt_state, batch):
            batch = training.split_micro_batches(batch, args.accum_steps)
            params, batch_stats, opt_state, metrics = step(params, batch_stats, opt_state, batch)
            return params, batch_stats, opt_state, metrics.loss.mean()

    @jax.jit
    def predict(params, batch_stats, x):
        logits, _ = forward(params, batch_stats, x, train=False)
        return jnp.argmax(logits, axis=-1)

    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    with tqdm(total=args.epochs * steps_per_epoch, desc="train", unit="step") as bar:
        for _ in range(args.epochs):
            order = rng.permutation(len(x_train))
            for s in range(steps_per_epoch):
                idx = order[s * args.batch_size : (s + 1) * args.batch_size]
                batch = (jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
                params, batch_stats, opt_state, loss = train_step(
                    params, batch_stats, opt_state, batch
                )
                bar.update()
            bar.set_postfix(loss=f"{float(loss):.4f}")

    pred = predict(params, batch_stats, jnp.asarray(x_test))
    accuracy = float(np.mean(np.asarray(pred) == y_test))
    elapsed = time.perf_counter() - start
    print(f"test accuracy: {accuracy:.4f} ({len(y_test)} images), wall time {elapsed:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
