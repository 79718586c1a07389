"""Export whole-model PyTorch fixtures for the model-porting tests (`bnjax.testing`).

Usage (needs torch==2.13.0, CPU):

    python scripts/export_port_fixtures.py --out tests/fixtures

Three models, each written the way torchvision writes it, with reduced sizes so the
files stay small:

  port_resnet18.npz   ResNet-18's architecture (torchvision `resnet.py`: a 7x7 stem,
                      BatchNorm, max-pool, `layer1`..`layer4` `nn.Sequential` stages of
                      2 `BasicBlock`s, `downsample` = conv1x1 + BatchNorm, `fc`), widths
                      (2, 4, 8, 16) instead of (64, 128, 256, 512); input (4, 3, 16, 16).
  port_mlp.npz        torchvision.ops.MLP-style: `nn.Sequential` of Linear,
                      BatchNorm1d, ReLU, Dropout(0.25) per hidden layer, then Linear,
                      Dropout(0.25); input (8, 6).
  port_bn_nobias.npz  conv -> BatchNorm2d(bias=False) -> ReLU, twice, global average
                      pool, Linear; the BatchNorms have a weight and no bias.

Each file is written by `bnjax.testing.export_fixture`: the initial state_dict, outputs
in eval and train mode (Dropout off in train mode: its masks are random), the state
after the training forward, the cross-entropy loss and every parameter's gradient, and
2 steps of SGD(lr=0.1, momentum=0.9). Determinism: fixed seeds, one thread,
deterministic algorithms, the scalar ATen kernels and no oneDNN (as in
`export_torch_fixtures.py`), so a re-run reproduces the arrays bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Pinned before torch is imported: they pick kernels at load time.
_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
for _k, _v in _ENV.items():
    os.environ[_k] = _v

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bnjax import testing  # noqa: E402

TORCH_VERSION = "2.13.0"
COMMAND = "python scripts/export_port_fixtures.py --out tests/fixtures"
FIXTURE_NAMES = ("port_resnet18.npz", "port_mlp.npz", "port_bn_nobias.npz")
STEPS = 2


# --------------------------------------------------------------------------- models


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's `BasicBlock`, line for line."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's `ResNet` (BasicBlock, zero_init_residual=False, groups=1)."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(2, 4, 8, 16), num_classes=5) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class MLP(nn.Sequential):
    """torchvision.ops.MLP: [Linear, norm, activation, Dropout] per hidden, Linear, Dropout."""

    def __init__(self, in_channels: int, hidden_channels: list[int], dropout: float = 0.25):
        layers: list[nn.Module] = []
        in_dim = in_channels
        for hidden_dim in hidden_channels[:-1]:
            layers += [
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            in_dim = hidden_dim
        layers += [nn.Linear(in_dim, hidden_channels[-1]), nn.Dropout(dropout)]
        super().__init__(*layers)


class NoBiasBNNet(nn.Module):
    """conv -> BatchNorm2d(bias=False) -> relu, twice; pool; linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- export


def _perturb_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine and running statistics (a 'pretrained' model)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(1.0 + 0.3 * torch.randn(c, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(1.0 + 0.5 * torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(10)


def export(out: Path, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, desc: str):
    testing.export_fixture(
        out / name,
        model,
        (x,),
        loss=lambda logits: F.cross_entropy(logits, y),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        steps=STEPS,
        extra={"labels": y},
        description=desc + " Loss: mean cross_entropy against extra/labels.",
        command=COMMAND,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = parser.parse_args(argv)
    if torch.__version__.split("+")[0] != TORCH_VERSION:
        print(
            f"error: pinned to torch=={TORCH_VERSION}, found {torch.__version__}", file=sys.stderr
        )
        return 2
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    resnet = ResNet()
    _perturb_bn(resnet, gen)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    y = torch.randint(0, 5, (4,), generator=gen)
    export(
        args.out,
        "port_resnet18.npz",
        resnet,
        x,
        y,
        "ResNet-18 architecture (torchvision resnet.py, BasicBlock [2, 2, 2, 2]), widths "
        "(2, 4, 8, 16), 5 classes, input NCHW.",
    )

    torch.manual_seed(1)
    mlp = MLP(6, [16, 8, 4])
    _perturb_bn(mlp, gen)
    x = torch.randn(8, 6, generator=gen) * 2 + 1
    y = torch.randint(0, 4, (8,), generator=gen)
    export(
        args.out,
        "port_mlp.npz",
        mlp,
        x,
        y,
        "torchvision.ops.MLP(6, [16, 8, 4], norm_layer=BatchNorm1d, dropout=0.25).",
    )

    torch.manual_seed(2)
    net = NoBiasBNNet()
    _perturb_bn(net, gen)
    x = torch.randn(4, 3, 6, 6, generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    export(
        args.out,
        "port_bn_nobias.npz",
        net,
        x,
        y,
        "conv-BatchNorm2d(bias=False)-relu x2, mean pool, Linear; input NCHW.",
    )
    for name in FIXTURE_NAMES:
        print(f"{(args.out / name).stat().st_size:>9d}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
