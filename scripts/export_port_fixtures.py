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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_models import MLP, NoBiasBNNet, ResNet  # noqa: E402

from bnjax import testing  # noqa: E402

TORCH_VERSION = "2.13.0"
COMMAND = "python scripts/export_port_fixtures.py --out tests/fixtures"
FIXTURE_NAMES = ("port_resnet18.npz", "port_mlp.npz", "port_bn_nobias.npz")
STEPS = 2


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
        float64=False,  # these files predate the float64 reference; kept bit for bit
    )


#: (file, init seed, model, input from the generator, classes, description), in order:
#: the models share one generator, so the order fixes every array.
MODELS = (
    (
        "port_resnet18.npz",
        0,
        ResNet,
        lambda gen: torch.randn(4, 3, 16, 16, generator=gen),
        5,
        "ResNet-18 architecture (torchvision resnet.py, BasicBlock [2, 2, 2, 2]), widths "
        "(2, 4, 8, 16), 5 classes, input NCHW.",
    ),
    (
        "port_mlp.npz",
        1,
        lambda: MLP(6, [16, 8, 4]),
        lambda gen: torch.randn(8, 6, generator=gen) * 2 + 1,
        4,
        "torchvision.ops.MLP(6, [16, 8, 4], norm_layer=BatchNorm1d, dropout=0.25).",
    ),
    (
        "port_bn_nobias.npz",
        2,
        NoBiasBNNet,
        lambda gen: torch.randn(4, 3, 6, 6, generator=gen),
        3,
        "conv-BatchNorm2d(bias=False)-relu x2, mean pool, Linear; input NCHW.",
    ),
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

    for name, seed, build, make_x, classes, description in MODELS:
        torch.manual_seed(seed)
        model = build()
        _perturb_bn(model, gen)
        x = make_x(gen)
        y = torch.randint(0, classes, (x.shape[0],), generator=gen)
        export(args.out, name, model, x, y, description)
    for name in FIXTURE_NAMES:
        print(f"{(args.out / name).stat().st_size:>9d}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
