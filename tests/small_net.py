"""A functional JAX port of `SmallNet` from `scripts/export_torch_fixtures.py`, for tests.

The torch net: conv1 = Conv2d(1, 4, 3, padding=1), bn1 = BatchNorm2d(4),
conv2 = Conv2d(4, 8, 3, padding=1), bn2 = BatchNorm2d(8), fc = Linear(8, 10);
relu(bn1(conv1(x))) -> relu(bn2(conv2(.))) -> mean over H, W -> fc. Here it runs
channels-last: inputs are NHWC `(N, 8, 8, 1)` float32, labels int `(N,)`.

API (all pure; trees are plain nested dicts keyed like the torch modules):

    params, batch_stats = from_torch_state_dict(sd)      # via bnjax.interop
    sd = to_torch_state_dict(params, batch_stats)        # exact inverse, NumPy
    params, batch_stats = init(key)                      # torch's default init scheme
    logits, new_batch_stats = forward(params, batch_stats, x_nhwc, train)
    loss, (new_batch_stats, aux) = loss_fn(params, batch_stats, (x, y))   # train mode
    x_nhwc = nchw_to_nhwc(x_nchw)

`params` = {"conv1": {"weight" (3, 3, 1, 4) HWIO, "bias" (4,)}, "bn1": {"weight",
"bias"} (4,), "conv2": {"weight" (3, 3, 4, 8), "bias"}, "bn2": {...} (8,), "fc":
{"weight" (8, 10) (in, out), "bias" (10,)}}; `batch_stats` = {"bn1": {...}, "bn2":
{...}} with bnjax's running statistics. `train=True` uses batch statistics and updates
the running ones (momentum 0.1, eps 1e-5, PyTorch's defaults); `train=False` is the
net in `eval()`. `loss_fn` is mean cross-entropy over the batch, `aux = {"logits"}`;
pass `train=False` for a frozen-BN net (scenario d). Convolutions and the matmul use
`Precision.HIGHEST` so that accelerators do not drop to TF32/bf16 passes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bnjax
from bnjax import interop

Tree = dict[str, Any]
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
_HI = lax.Precision.HIGHEST


def from_torch_state_dict(sd: Any) -> tuple[Tree, Tree]:
    """torch `SmallNet.state_dict()` -> `(params, batch_stats)` as JAX arrays (HWIO, (in, out))."""
    params, batch_stats = interop.from_torch_state_dict(sd)
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, batch_stats)


def to_torch_state_dict(params: Tree, batch_stats: Tree) -> dict[str, np.ndarray]:
    """The exact inverse of `from_torch_state_dict` (NumPy arrays, torch layouts)."""
    return interop.to_torch_state_dict(params, batch_stats)


def init(key: jax.Array) -> tuple[Tree, Tree]:
    """Fresh parameters with torch's default scheme: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    keys = iter(jax.random.split(key, 6))

    def uniform(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(next(keys), shape, jnp.float32, -bound, bound)

    params: Tree = {
        "conv1": {"weight": uniform((3, 3, 1, 4), 9), "bias": uniform((4,), 9)},
        "conv2": {"weight": uniform((3, 3, 4, 8), 36), "bias": uniform((8,), 36)},
        "fc": {"weight": uniform((8, 10), 8), "bias": uniform((10,), 8)},
    }
    batch_stats: Tree = {}
    for name, c in (("bn1", 4), ("bn2", 8)):
        params[name], batch_stats[name] = bnjax.init(c)
    return params, batch_stats


def forward(
    params: Tree, batch_stats: Tree, x_nhwc: jax.Array, train: bool
) -> tuple[jax.Array, Tree]:
    """Logits `(N, 10)` and the new batch_stats for NHWC inputs `(N, 8, 8, 1)`."""
    new_stats: Tree = {}
    h = x_nhwc
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        h = _conv(params[conv], h)
        h, new_stats[bn] = bnjax.apply(
            params[bn], batch_stats[bn], h, train, momentum=BN_MOMENTUM, eps=BN_EPS, axis=-1
        )
        h = jax.nn.relu(h)
    pooled = jnp.mean(h, axis=(1, 2))
    logits = jnp.dot(pooled, params["fc"]["weight"], precision=_HI) + params["fc"]["bias"]
    return logits, new_stats


def loss_fn(
    params: Tree, batch_stats: Tree, batch: tuple[jax.Array, jax.Array], *, train: bool = True
) -> tuple[jax.Array, tuple[Tree, dict[str, jax.Array]]]:
    """Mean cross-entropy of a batch `(x_nhwc, labels)`: `(loss, (new_batch_stats, aux))`."""
    x, y = batch
    logits, new_stats = forward(params, batch_stats, x, train)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=1))
    return loss, (new_stats, {"logits": logits})


def nchw_to_nhwc(x: Any) -> jax.Array:
    """torch's `(N, C, H, W)` -> `(N, H, W, C)`."""
    return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


def _conv(p: Tree, x: jax.Array) -> jax.Array:
    y = lax.conv_general_dilated(
        x,
        p["weight"],
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HI,
    )
    return y + p["bias"]
