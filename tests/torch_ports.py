"""Flax (linen) ports of the models in `scripts/export_port_fixtures.py`.

Each model is written once; `named=True` gives its submodules torch's names
(`conv1`, `layer1/0/downsample/0`, MLP indices `0`, `1`, `4`...), `named=False` leaves
Flax's automatic names (`Conv_0`, `BasicBlock_3`, `Dense_2`...). Both load the same
torch `state_dict` with one `bnjax.interop.from_torch` call.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

import bnjax.linen


def _name(named: bool, name: str) -> str | None:
    return name if named else None


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    named: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        n = lambda s: _name(self.named, s)  # noqa: E731
        identity = x
        out = nn.Conv(self.planes, (3, 3), self.stride, padding=1, use_bias=False, name=n("conv1"))(
            x
        )
        out = nn.relu(bnjax.linen.BatchNorm(name=n("bn1"))(out, train=train))
        out = nn.Conv(self.planes, (3, 3), padding=1, use_bias=False, name=n("conv2"))(out)
        out = bnjax.linen.BatchNorm(name=n("bn2"))(out, train=train)
        if self.downsample:
            identity = Downsample(self.planes, self.stride, self.named, name=n("downsample"))(
                x, train
            )
        return nn.relu(out + identity)


class Downsample(nn.Module):
    """torch's `nn.Sequential(conv1x1, BatchNorm2d)`: submodules `0` and `1`."""

    planes: int
    stride: int
    named: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        n = lambda s: _name(self.named, s)  # noqa: E731
        x = nn.Conv(self.planes, (1, 1), self.stride, use_bias=False, name=n("0"))(x)
        return bnjax.linen.BatchNorm(name=n("1"))(x, train=train)


class Stage(nn.Module):
    """torch's `nn.Sequential` of BasicBlocks: submodules `0`, `1`."""

    planes: int
    blocks: int
    stride: int
    downsample: bool
    named: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.blocks):
            first = i == 0
            x = BasicBlock(
                self.planes,
                self.stride if first else 1,
                self.downsample and first,
                self.named,
                name=_name(self.named, str(i)),
            )(x, train)
        return x


class ResNet(nn.Module):
    """ResNet-18's architecture, NHWC, as torchvision's `ResNet(BasicBlock, [2, 2, 2, 2])`."""

    widths: Sequence[int] = (2, 4, 8, 16)
    layers: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = 5
    named: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        n = lambda s: _name(self.named, s)  # noqa: E731
        x = nn.Conv(self.widths[0], (7, 7), 2, padding=3, use_bias=False, name=n("conv1"))(x)
        x = nn.relu(bnjax.linen.BatchNorm(name=n("bn1"))(x, train=train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        inplanes = self.widths[0]
        for i, (w, b) in enumerate(zip(self.widths, self.layers, strict=True)):
            stride = 1 if i == 0 else 2
            down = stride != 1 or inplanes != w
            x = Stage(w, b, stride, down, self.named, name=n(f"layer{i + 1}"))(x, train)
            inplanes = w
        return nn.Dense(self.num_classes, name=n("fc"))(jnp.mean(x, axis=(1, 2)))


class MLP(nn.Module):
    """torchvision.ops.MLP with BatchNorm1d; torch's indices 0, 1, 4, 5, 8 as names."""

    hidden: Sequence[int] = (16, 8, 4)
    dropout: float = 0.25
    named: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        # Dropout is active only when training with a 'dropout' rng (the fixtures run
        # torch's training pass with Dropout off: its masks are random).
        deterministic = not train or not self.has_rng("dropout")
        i = 0
        for h in self.hidden[:-1]:
            x = nn.Dense(h, name=_name(self.named, str(i)))(x)
            x = bnjax.linen.BatchNorm(name=_name(self.named, str(i + 1)))(x, train=train)
            x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=deterministic)
            i += 4
        x = nn.Dense(self.hidden[-1], name=_name(self.named, str(i)))(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class NoBiasBNNet(nn.Module):
    """conv -> BatchNorm2d(bias=False) -> relu, twice; mean pool; linear (NHWC)."""

    named: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        n = lambda s: _name(self.named, s)  # noqa: E731
        for i, c in enumerate((4, 6), start=1):
            x = nn.Conv(c, (3, 3), padding=1, use_bias=False, name=n(f"conv{i}"))(x)
            x = bnjax.linen.BatchNorm(use_bias=False, name=n(f"bn{i}"))(x, train=train)
            x = nn.relu(x)
        return nn.Dense(3, name=n("fc"))(jnp.mean(x, axis=(1, 2)))
