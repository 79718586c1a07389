"""The torch models of `export_pairing_fixtures.py` (layer pairing, issue 23).

Importable without side effects; tests that need live torch import it directly.

- `ShortcutNet`: a stem (conv, BatchNorm), 12 identical residual blocks in an
  `nn.Sequential` (torchvision's `BasicBlock` with a `downsample` conv1x1 + BatchNorm,
  registered and called after `conv2`/`bn2`), a mean pool and a Linear. Its Flax port
  (`tests/pairing_models.py`) calls the shortcut first and uses Flax's automatic
  names, so 12 siblings (`Block_0`..`Block_11`) and three same-shaped BatchNorms per
  block are paired by what they compute, not by name.
- `SENet`: a stem and 3 squeeze-excitation blocks whose squeeze and excite layers are
  1x1 `Conv2d`s (as torchvision writes them); the Flax port uses `nn.Dense`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WIDTH = 4
BLOCKS = 12


class Block(nn.Module):
    """torchvision's `BasicBlock` (stride 1) with a conv1x1 + BatchNorm `downsample`."""

    def __init__(self, planes: int = WIDTH) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(
            nn.Conv2d(planes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x)
        return self.relu(out + identity)


class ShortcutNet(nn.Module):
    def __init__(self, blocks: int = BLOCKS, width: int = WIDTH, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: 1x1 convolutions on the pooled features."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class SEBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.se = SqueezeExcitation(channels, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(F.relu(self.bn(self.conv(x))))


class SENet(nn.Module):
    def __init__(self, blocks: int = 3, width: int = WIDTH, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[SEBlock(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct BatchNorm affine and running statistics per layer (a 'pretrained' model).

    Every BatchNorm then computes something different in eval and train mode, so a
    BatchNorm loaded into the wrong layer changes the outputs; the biases lean positive
    so that no block's ReLU output is all zeros (a dead block computes nothing to pair by).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                m.bias.copy_(0.2 + 0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.add_(0.3)  # squeeze-excitation: keep the squeezed ReLU alive
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    """A seeded, perturbed model: `"shortcut"` or `"se"`."""
    torch.manual_seed(seed)
    model = {"shortcut": ShortcutNet, "se": SENet}[name]()
    return perturb(model, seed)
