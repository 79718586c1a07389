"""Export the PyTorch fixtures of `bnjax.testing`'s own tests (`tests/test_check_model.py`).

Usage (needs torch==2.13.0, CPU):

    python scripts/export_testing_fixtures.py --out tests/fixtures

One model, written as image classifiers nobody here wrote are written (MobileNetV3 /
EfficientNet style), at small sizes so the file stays small:

  testing_mbnet.npz   stem conv (bias-free) + BatchNorm + ReLU6; three inverted-residual
                      blocks (1x1 expand without bias, BatchNorm, depthwise 3x3 without
                      bias, BatchNorm, squeeze-excitation with 1x1 convolutions,
                      functional `F.dropout(training=self.training)`, 1x1 project,
                      BatchNorm, stochastic depth `DropPath` on the residual branch
                      of the stride-1 block); 1x1 head conv + BatchNorm, mean pool,
                      `nn.Dropout`, Linear. Width 4, input (4, 3, 4, 4), 5 classes.
                      The last block and the head normalize 4 values per channel
                      (1x1 maps); with `SEED` PyTorch's own float32 gradients are
                      5e-5 from float64, above a fixed 1e-5, as in deep classifiers.
  testing_docs.npz    docs/testing.md's model (the page exports the same one when torch
                      is installed): Linear stem + BatchNorm1d, two residual blocks
                      (bias-free Linear, BatchNorm1d, ReLU, functional dropout), Linear
                      head; input (8, 6), 3 classes, 3 SGD steps over 3 batches.

Written by `bnjax.testing.export_fixture` with its defaults: the stochastic layers
(DropPath, the functional dropout, nn.Dropout) are found by running the training pass
twice and made deterministic; a float64 copy of the model records the float64
reference; 3 SGD(lr=0.1, momentum=0.9) steps, each on its own batch and labels
(`targets`). Determinism: fixed seeds, one thread, deterministic algorithms, the
scalar ATen kernels and no oneDNN, so a re-run reproduces the arrays bit for bit.
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
COMMAND = "python scripts/export_testing_fixtures.py --out tests/fixtures"
FIXTURE_NAMES = ("testing_mbnet.npz", "testing_docs.npz")
STEPS = 3
#: Of the seeds 0..29 (models and batches alike), the one whose PyTorch float32
#: gradients are furthest from float64 (5e-5): a model at the conditioning of the deep
#: classifiers in issue 23, where a fixed 1e-5 fails a correct port.
SEED = 29


class DropPath(nn.Module):
    """Stochastic depth (timm's `DropPath`): drops whole examples of the residual branch."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1) >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.fc2(s))


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int, stride: int, drop_path: float) -> None:
        super().__init__()
        hidden = channels * expand
        self.stride = stride
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, channels // 2))
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = F.dropout(self.se(h), 0.1, self.training)
        h = self.bn3(self.project(h))
        if self.stride != 1:
            return h
        return x + self.drop_path(h)


class MBNet(nn.Module):
    def __init__(self, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(
            InvertedResidual(width, 2, 1, 0.2),
            InvertedResidual(width, 2, 2, 0.0),
            InvertedResidual(width, 3, 2, 0.0),
        )
        self.head = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(2 * width)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = F.relu6(self.head_bn(self.head(x)))
        return self.fc(self.dropout(x.mean((2, 3))))


class DocsBlock(nn.Module):
    """docs/testing.md's residual block (copied there verbatim)."""

    def __init__(self, width: int, drop: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.fc(x)))
        return x + F.dropout(h, self.drop, self.training)


class DocsNet(nn.Module):
    """docs/testing.md's model (copied there verbatim)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.block1 = DocsBlock(8, 0.2)
        self.block2 = DocsBlock(8, 0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        return self.head(self.block2(self.block1(x)))


def export_docs(out: Path) -> None:
    """What docs/testing.md's first block runs (same seeds, same calls)."""
    torch.manual_seed(0)
    net = DocsNet()
    batches = [(torch.randn(8, 6) * 2 + 1, torch.randint(0, 3, (8,))) for _ in range(3)]
    (x, labels), later = batches[0], batches[1:]
    testing.export_fixture(
        out / "testing_docs.npz",
        net,
        (x,),
        targets=(labels,),
        loss=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        batches=[((xk,), (yk,)) for xk, yk in later],
        description="docs/testing.md's model; loss: mean cross_entropy against targets/0.",
        command=COMMAND,
    )


def _perturb_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine and running statistics (a 'pretrained' model)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(7)


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
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = MBNet()
    _perturb_bn(model, gen)
    batches = [
        (
            torch.randn(4, 3, 4, 4, generator=gen) * (1 + k) + k,
            torch.randint(0, 5, (4,), generator=gen),
        )
        for k in range(STEPS)
    ]
    (x, y), later = batches[0], batches[1:]
    testing.export_fixture(
        args.out / "testing_mbnet.npz",
        model,
        (x,),
        targets=(y,),
        loss=lambda logits, labels: F.cross_entropy(logits, labels),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        batches=[((xk,), (yk,)) for xk, yk in later],
        description=(
            "MobileNet-style classifier: depthwise convs, squeeze-excitation with 1x1 "
            "convs, bias-free convs, 7 BatchNorms, DropPath, F.dropout, nn.Dropout; input "
            "NCHW (4, 3, 4, 4); loss: mean cross_entropy against the batch's targets/0."
        ),
        command=COMMAND,
    )
    export_docs(args.out)
    for name in FIXTURE_NAMES:
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
