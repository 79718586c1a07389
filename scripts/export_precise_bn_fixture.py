"""Export a `torch.optim.swa_utils.update_bn` run as an `.npz` fixture for bnjax.deploy.

Usage (needs torch==2.13.0, CPU):

    /work/venv-torch/bin/python scripts/export_precise_bn_fixture.py \
        --out tests/fixtures/precise_bn_update_bn.npz

The model is a small CNN, NCHW: conv1(1->4, 3x3, pad 1) - bn1 - relu - conv2(4->8,
3x3, pad 1) - bn2 - relu - mean over H, W - fc(8->10). Its weights come from a fixed
seed; its BatchNorms get random weights, biases and running statistics (so that the
reset inside `update_bn` shows). Four batches of 6x6 one-channel images with sizes
5, 5, 5, 3 (unequal, so equal-weight and pooled statistics differ) go through
`update_bn`.

Arrays (float32, `num_batches_tracked` int64):
  `before/<state_dict key>`  the model's state before `update_bn`;
  `batch_<i>`                the i-th batch, NCHW;
  `after/<state_dict key>`   the state after `update_bn`.
`__meta__` is a JSON string: torch version, the command, the config, the layout.
Determinism: fixed seed, one thread, scalar ATen kernels, oneDNN off; a re-run
reproduces the arrays bit for bit (`tests/test_precise_bn.py` checks it when torch is
importable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# The main exporter pins the kernel-selecting environment before it imports torch,
# and defines the small CNN (the SmallNet of scenarios c and d) used here too.
from export_torch_fixtures import _ENV
from export_torch_fixtures import SmallNet as SmallCNN
from export_torch_fixtures import _state_dict as _state

# isort: split
import torch
from torch.optim.swa_utils import update_bn

COMMAND = (
    "python scripts/export_precise_bn_fixture.py --out tests/fixtures/precise_bn_update_bn.npz"
)
SEED = 0
BATCH_SIZES = (5, 5, 5, 3)
IMAGE = (1, 6, 6)


def record_update_bn(model, batch_sizes, image, out: dict[str, np.ndarray]) -> None:
    """Runs `update_bn` on random batches; records them (`batch_<i>`) and `after/<key>`."""
    # Inputs with a non-zero mean per batch, so the between-batch spread is visible.
    batches = [torch.randn(n, *image) + 0.5 * i for i, n in enumerate(batch_sizes)]
    out.update({f"batch_{i}": b.numpy().copy() for i, b in enumerate(batches)})
    model.train()
    update_bn(batches, model)
    out.update({f"after/{k}": v for k, v in _state(model).items()})


def build() -> dict[str, np.ndarray]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    model = SmallCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(17)
    out = {f"before/{k}": v for k, v in _state(model).items()}
    record_update_bn(model, BATCH_SIZES, IMAGE, out)
    meta = {
        "torch_version": torch.__version__,
        "command": COMMAND,
        "scenario": "torch.optim.swa_utils.update_bn(batches, model) on a small CNN",
        "config": {
            "seed": SEED,
            "batch_sizes": list(BATCH_SIZES),
            "image_chw": list(IMAGE),
            "model": "conv1(1->4,3x3,p1)-bn1-relu-conv2(4->8,3x3,p1)-bn2-relu-mean(HW)-fc(8->10)",
            "bn_momentum_during_update_bn": None,
            "env": _ENV,
        },
        "layout": {
            "before/<key>": "state_dict before update_bn (torch names, OIHW kernels)",
            "batch_<i>": "i-th batch, NCHW float32",
            "after/<key>": "state_dict after update_bn",
        },
    }
    out["__meta__"] = np.asarray(json.dumps(meta, sort_keys=True))
    return out


def main(build=None, doc: str | None = None, *, compressed: bool = False) -> None:
    """The command line of this exporter (and of others that reuse it): `--out FILE`."""
    parser = argparse.ArgumentParser(description=(doc or __doc__).splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    args = parser.parse_args()
    arrays = (build or globals()["build"])()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(args.out, **arrays)
    print(f"wrote {args.out} ({len(arrays)} arrays, torch {torch.__version__})")


if __name__ == "__main__":
    main()
