"""Train a small CNN with `bnjax.nnx.BatchNorm` on scikit-learn's bundled digits.

The Flax nnx version of `train_digits.py`: Conv-BN-ReLU blocks, channels-last, a
jitted `nnx.jit` train step that updates the parameters and the BatchNorm running
statistics in place, and PyTorch-style mode switching: `model.train()` for training,
`model.eval()` to evaluate with the running statistics. No download.

    python examples/train_digits_nnx.py        # ~10-20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import bnjax.nnx

# The data of the main example (this folder is on sys.path as a script).
from train_digits import load_data

CHANNELS = (16, 32)


class CNN(nnx.Module):
    """conv(3x3)-BN-ReLU x2 (max-pool after the first), global average pool, dense."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        c_in = 1
        self.convs = nnx.List()
        self.bns = nnx.List()
        for c in CHANNELS:
            # BN's bias replaces the conv's.
            self.convs.append(nnx.Conv(c_in, c, (3, 3), use_bias=False, rngs=rngs))
            self.bns.append(bnjax.nnx.BatchNorm(c))  # PyTorch's momentum=0.1
            c_in = c
        self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            x = nnx.relu(bn(conv(x)))
            if i == 0:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.mean(axis=(1, 2)))


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One Adam step; BatchNorm's running statistics are updated in place."""

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: CNN, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = CNN(rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    model.train()  # batch statistics, running statistics updated (the default)
    with tqdm(total=args.epochs * steps_per_epoch, desc="train", unit="step") as bar:
        for _ in range(args.epochs):
            order = rng.permutation(len(x_train))
            for s in range(steps_per_epoch):
                idx = order[s * args.batch_size : (s + 1) * args.batch_size]
                loss = train_step(
                    model, optimizer, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
                )
                bar.update()
            bar.set_postfix(loss=f"{float(loss):.4f}")

    model.eval()  # running statistics, as PyTorch's eval()
    pred = predict(model, jnp.asarray(x_test))
    accuracy = float(np.mean(np.asarray(pred) == y_test))
    elapsed = time.perf_counter() - start
    print(f"test accuracy: {accuracy:.4f} ({len(y_test)} images), wall time {elapsed:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
