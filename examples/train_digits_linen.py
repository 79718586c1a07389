"""Train a small CNN with `bnjax.linen.BatchNorm` on scikit-learn's bundled digits.

The Flax linen version of `train_digits.py`: Conv-BN-ReLU blocks, channels-last,
a `TrainState` that carries the `batch_stats` collection through a jitted train
step (`mutable=["batch_stats"]`), evaluation with `train=False` (the running
statistics, as PyTorch's `eval()`). No download: the data ships with scikit-learn.

    python examples/train_digits_linen.py      # ~10-20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import bnjax.linen

# The data of the main example (this folder is on sys.path as a script).
from train_digits import load_data

CHANNELS = (16, 32)


class CNN(nn.Module):
    """conv(3x3)-BN-ReLU x2 (max-pool after the first), global average pool, dense."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, c in enumerate(CHANNELS):
            x = nn.Conv(c, (3, 3), use_bias=False)(x)  # BN's bias replaces the conv's
            x = bnjax.linen.BatchNorm()(x, train=train)  # PyTorch's momentum=0.1
            x = nn.relu(x)
            if i == 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any  # the model's `batch_stats` collection


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    """One Adam step; the updated running statistics come back through `mutable`."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    return state, loss


@jax.jit
def predict(state: TrainState, x: jax.Array) -> jax.Array:
    """Class predictions in eval mode (running statistics; nothing is mutated)."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, False)
    return jnp.argmax(logits, axis=-1)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = CNN()
    variables = model.init(jax.random.key(args.seed), jnp.asarray(x_train[:2]), train=False)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(args.lr),
        batch_stats=variables["batch_stats"],
    )

    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    with tqdm(total=args.epochs * steps_per_epoch, desc="train", unit="step") as bar:
        for _ in range(args.epochs):
            order = rng.permutation(len(x_train))
            for s in range(steps_per_epoch):
                idx = order[s * args.batch_size : (s + 1) * args.batch_size]
                state, loss = train_step(
                    state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
                )
                bar.update()
            bar.set_postfix(loss=f"{float(loss):.4f}")

    pred = predict(state, jnp.asarray(x_test))
    accuracy = float(np.mean(np.asarray(pred) == y_test))
    elapsed = time.perf_counter() - start
    print(f"test accuracy: {accuracy:.4f} ({len(y_test)} images), wall time {elapsed:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
