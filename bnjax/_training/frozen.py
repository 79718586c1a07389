"""Frozen BatchNorm: BatchNorm parameters that the optimizer never changes.

A BatchNorm's parameters are found through its statistics: wherever `batch_stats`
holds a BatchNorm's dict (the one rule, `conventions.is_batch_stats`), the
parameters at the same path are that BatchNorm's `weight` (and `bias`). This holds
for the functional convention (`params["block"]["bn"]` beside
`batch_stats["block"]["bn"]`), for Flax linen collections and for nnx states.
"""

from __future__ import annotations

from typing import Any

import jax

from bnjax._core.conventions import STAT_KEYS, to_plain_dict
from bnjax._core.extras import needs
from bnjax._model.tree import plain_path, stats_at

with needs("bnjax.training", "optax"):
    import optax

PyTree = Any


def batchnorm_mask(params: PyTree, batch_stats: PyTree) -> PyTree:
    """Marks the BatchNorm parameters of `params`, found through `batch_stats`.

    A BatchNorm is a dict of `batch_stats` with exactly the keys `running_mean`,
    `running_var`, `num_batches_tracked`; the parameters at the same path in
    `params` (its `weight` and `bias`) are marked True, every other leaf False.

    Args:
      params: the model's parameters.
      batch_stats: the model's BatchNorm statistics, at the same paths.

    Returns:
      A tree of Python bools with `params`' structure, for `optax.masked`.

    Raises:
      ValueError: `batch_stats` holds no BatchNorm statistics.

    Example:
      >>> p, s = bnjax.init(3)
      >>> bnjax.training.batchnorm_mask({"bn": p, "w": jnp.ones(2)}, {"bn": s})
      {'bn': {'bias': True, 'weight': True}, 'w': False}
    """
    bn_paths = set(stats_at(to_plain_dict(batch_stats)))
    if not bn_paths:
        raise ValueError(
            "bnjax.training.batchnorm_mask: batch_stats holds no BatchNorm statistics "
            f"(no dict with exactly the keys {sorted(STAT_KEYS)})."
        )

    def is_bn(path: Any, _leaf: Any) -> bool:
        keys = plain_path(path)
        return any(keys[: len(bn)] == bn for bn in bn_paths)

    return jax.tree_util.tree_map_with_path(is_bn, params)


def freeze_batchnorm(
    optimizer: optax.GradientTransformation, params: PyTree, batch_stats: PyTree
) -> optax.GradientTransformation:
    """Wraps `optimizer` so that BatchNorm parameters never change ("frozen BN").

    BatchNorm weights get zero updates and no optimizer state (as PyTorch parameters
    with `requires_grad=False`: no momentum, no weight decay); every other parameter
    is updated by `optimizer`. Pair it with a `loss_fn` that calls BatchNorm with
    `train=False`, so the running statistics are used and left bit-identical.

    Args:
      optimizer: the optax transformation for the trainable parameters.
      params: the model's parameters (only their structure is used).
      batch_stats: the model's BatchNorm statistics, at the same paths as
        their parameters (see `batchnorm_mask`).

    Returns:
      An `optax.multi_transform` of `optimizer` and `optax.set_to_zero()`.

    Raises:
      ValueError: `batch_stats` holds no BatchNorm statistics.

    Example:
      >>> import jax, optax
      >>> p, s = bnjax.init(3)
      >>> params, batch_stats = {"bn": p, "w": jnp.ones(3)}, {"bn": s}
      >>> opt = bnjax.training.freeze_batchnorm(optax.sgd(0.1), params, batch_stats)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> updates["bn"]["weight"]
      Array([0., 0., 0.], dtype=float32)
    """
    labels = jax.tree.map(
        lambda frozen: "frozen" if frozen else "train", batchnorm_mask(params, batch_stats)
    )
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
