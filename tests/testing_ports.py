"""Flax (linen) port of `scripts/export_testing_fixtures.py`'s model, with torch's names.

The torch model's stochastic layers (DropPath, `F.dropout`, `nn.Dropout`) ran
deterministically in the fixture's training pass (the exporter put them in eval mode),
so the port leaves them out. `dtype` builds the same model in float64; `bn` passes
options to every BatchNorm (a deliberately wrong `epsilon` or `momentum` in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

import bnjax.linen


class SqueezeExcite(nn.Module):
    reduced: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.dtype}
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Conv(self.reduced, (1, 1), name="fc1", **kw)(s))
        return x * nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), name="fc2", **kw)(s))


class InvertedResidual(nn.Module):
    channels: int
    expand: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    bn: Mapping[str, Any] = FrozenDict()

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {"dtype": self.dtype, "param_dtype": self.dtype, "use_bias": False}
        bn = {"dtype": self.dtype, "param_dtype": self.dtype, **self.bn}
        hidden = self.channels * self.expand
        h = nn.Conv(hidden, (1, 1), name="expand", **kw)(x)
        h = jax.nn.relu6(bnjax.linen.BatchNorm(name="bn1", **bn)(h, train=train))
        h = nn.Conv(hidden, (3, 3), self.stride, padding=1, feature_group_count=hidden,
                    name="dw", **kw)(h)  # fmt: skip
        h = jax.nn.relu6(bnjax.linen.BatchNorm(name="bn2", **bn)(h, train=train))
        h = SqueezeExcite(max(1, self.channels // 2), self.dtype, name="se")(h)
        h = nn.Conv(self.channels, (1, 1), name="project", **kw)(h)
        h = bnjax.linen.BatchNorm(name="bn3", **bn)(h, train=train)
        return h if self.stride != 1 else x + h


class Blocks(nn.Module):
    """torch's `nn.Sequential` of blocks: submodules `0`, `1`, `2`."""

    width: int
    dtype: jnp.dtype = jnp.float32
    bn: Mapping[str, Any] = FrozenDict()

    @nn.compact
    def __call__(self, x, train: bool):
        for i, (expand, stride) in enumerate(((2, 1), (2, 2), (3, 2))):
            block = InvertedResidual(self.width, expand, stride, self.dtype, self.bn, name=str(i))
            x = block(x, train)
        return x


class MBNet(nn.Module):
    """The fixture's MobileNet-style classifier, NHWC."""

    width: int = 4
    classes: int = 5
    dtype: jnp.dtype = jnp.float32
    bn: Mapping[str, Any] = FrozenDict()

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {"dtype": self.dtype, "param_dtype": self.dtype}
        bn = {**kw, **self.bn}
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name="stem", **kw)(x)
        x = jax.nn.relu6(bnjax.linen.BatchNorm(name="bn", **bn)(x, train=train))
        x = Blocks(self.width, self.dtype, self.bn, name="blocks")(x, train)
        x = nn.Conv(2 * self.width, (1, 1), use_bias=False, name="head", **kw)(x)
        x = jax.nn.relu6(bnjax.linen.BatchNorm(name="head_bn", **bn)(x, train=train))
        return nn.Dense(self.classes, name="fc", **kw)(jnp.mean(x, axis=(1, 2)))
