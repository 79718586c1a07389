"""Flax ports of `scripts/torch_pairing_models.py`, written the way Flax code is written.

NHWC, Flax's automatic names (`Conv_0`, `BatchNorm_2`, `Block_11`) and a residual
block that calls its shortcut *first* (torch's registers and calls `downsample` last),
so nothing but what the layers compute pairs them with torch's. `SENet` writes the
squeeze-excitation with `nn.Dense` on pooled features where torch has 1x1 `Conv2d`s.
`dtype` is the parameters' dtype (float64 for the float64 checks).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

import bnjax.linen
import bnjax.nnx

WIDTH = 4
BLOCKS = 12


class Block(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {"param_dtype": self.dtype}
        shortcut = nn.Conv(x.shape[-1], (1, 1), use_bias=False, **kw)(x)
        shortcut = bnjax.linen.BatchNorm(**kw)(shortcut, train=train)
        y = nn.Conv(x.shape[-1], (3, 3), padding=1, use_bias=False, **kw)(x)
        y = nn.relu(bnjax.linen.BatchNorm(**kw)(y, train=train))
        y = nn.Conv(x.shape[-1], (3, 3), padding=1, use_bias=False, **kw)(y)
        y = bnjax.linen.BatchNorm(**kw)(y, train=train)
        return nn.relu(y + shortcut)


class ShortcutNet(nn.Module):
    blocks: int = BLOCKS
    width: int = WIDTH
    classes: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {"param_dtype": self.dtype}
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, **kw)(x)
        x = nn.relu(bnjax.linen.BatchNorm(**kw)(x, train=train))
        for _ in range(self.blocks):
            x = Block(self.dtype)(x, train)
        return nn.Dense(self.classes, **kw)(jnp.mean(x, axis=(1, 2)))


class SEBlock(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {"param_dtype": self.dtype}
        c = x.shape[-1]
        x = nn.Conv(c, (3, 3), padding=1, use_bias=False, **kw)(x)
        x = nn.relu(bnjax.linen.BatchNorm(**kw)(x, train=train))
        s = jnp.mean(x, axis=(1, 2))  # squeeze: Dense on pooled features
        s = nn.sigmoid(nn.Dense(c, **kw)(nn.relu(nn.Dense(c // 2, **kw)(s))))
        return x * s[:, None, None, :]


class SENet(nn.Module):
    blocks: int = 3
    width: int = WIDTH
    classes: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {"param_dtype": self.dtype}
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, **kw)(x)
        x = nn.relu(bnjax.linen.BatchNorm(**kw)(x, train=train))
        for _ in range(self.blocks):
            x = SEBlock(self.dtype)(x, train)
        return nn.Dense(self.classes, **kw)(jnp.mean(x, axis=(1, 2)))


class NnxBlock(nnx.Module):
    """The same block in nnx, with its own names (`shortcut`, `conv_a`...)."""

    def __init__(self, c: int, dtype: Any, rngs: nnx.Rngs):
        kw = {"param_dtype": dtype, "use_bias": False, "rngs": rngs}
        self.shortcut = nnx.Conv(c, c, (1, 1), **kw)
        self.shortcut_bn = bnjax.nnx.BatchNorm(c, param_dtype=dtype)
        self.conv_a = nnx.Conv(c, c, (3, 3), padding=1, **kw)
        self.bn_a = bnjax.nnx.BatchNorm(c, param_dtype=dtype)
        self.conv_b = nnx.Conv(c, c, (3, 3), padding=1, **kw)
        self.bn_b = bnjax.nnx.BatchNorm(c, param_dtype=dtype)

    def __call__(self, x):
        s = self.shortcut_bn(self.shortcut(x))
        y = nnx.relu(self.bn_a(self.conv_a(x)))
        return nnx.relu(self.bn_b(self.conv_b(y)) + s)


class NnxShortcutNet(nnx.Module):
    def __init__(self, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
        c = WIDTH
        self.stem = nnx.Conv(3, c, (3, 3), padding=1, use_bias=False, param_dtype=dtype,
                             rngs=rngs)  # fmt: skip
        self.stem_bn = bnjax.nnx.BatchNorm(c, param_dtype=dtype)
        self.body = nnx.List([NnxBlock(c, dtype, rngs) for _ in range(BLOCKS)])
        self.head = nnx.Linear(c, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.body:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))
