"""Export PyTorch's folding and precise-BN numbers on a small ResNet for bnjax.deploy.

Usage (needs torch==2.13.0, CPU):

    python scripts/export_resnet_deploy_fixture.py --out tests/fixtures/resnet_deploy.npz

The model is ResNet-shaped, NCHW, with torchvision's BasicBlock layout (convs without
bias, each followed by a BatchNorm): stem conv(3->4, 3x3, p1) - bn - relu; layer1:
two BasicBlocks 4->4; layer2: one BasicBlock 4->8, stride 2, with a downsample
conv(4->8, 1x1, s2) - BatchNorm(eps=1e-3); mean over H, W; fc(8->3). Weights come from
a fixed seed; every BatchNorm gets random weights, biases and running statistics.

Arrays (float32, `num_batches_tracked` int64):
  `state/<state_dict key>`      the model's state (torch names, OIHW kernels);
  `x`                           an eval input, (2, 3, 8, 8) NCHW;
  `eval_out`                    the model's eval-mode output on `x`;
  `fused/<conv>/weight|bias`    `torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)`
                                for each conv -> BatchNorm pair (OIHW kernel);
  `batch_<i>`                   batches for `update_bn`, sizes 5, 5, 3, NCHW;
  `after/<state_dict key>`      the state after `torch.optim.swa_utils.update_bn`.
`__meta__` is a JSON string: torch, numpy and Python versions, the command, the
config, the layout.
Determinism: fixed seed, one thread, scalar ATen kernels, oneDNN off.
"""

from __future__ import annotations

import json
import platform

import export_precise_bn_fixture
import numpy as np
from export_torch_fixtures import _ENV
from export_torch_fixtures import _state_dict as _state

# isort: split
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

COMMAND = "python scripts/export_resnet_deploy_fixture.py --out tests/fixtures/resnet_deploy.npz"
SEED = 0
BATCH_SIZES = (5, 5, 3)
IMAGE = (3, 8, 8)
DOWNSAMPLE_EPS = 1e-3


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                nn.BatchNorm2d(c_out, eps=DOWNSAMPLE_EPS),
            )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, stride=2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layer2(self.layer1(h))
        return self.fc(h.mean(dim=(2, 3)))


def _pairs(model: SmallResNet) -> dict[str, tuple[nn.Conv2d, nn.BatchNorm2d]]:
    pairs = {"conv1": (model.conv1, model.bn1)}
    for name, layer in (("layer1", model.layer1), ("layer2", model.layer2)):
        for i, block in enumerate(layer):
            pairs[f"{name}.{i}.conv1"] = (block.conv1, block.bn1)
            pairs[f"{name}.{i}.conv2"] = (block.conv2, block.bn2)
            if block.downsample is not None:
                pairs[f"{name}.{i}.downsample.0"] = (block.downsample[0], block.downsample[1])
    return pairs


def build() -> dict[str, np.ndarray]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    model = SmallResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(17)
    model.eval()
    x = torch.randn(2, *IMAGE)
    out = {f"state/{k}": v for k, v in _state(model).items()}
    out["x"] = x.numpy().copy()
    with torch.no_grad():
        out["eval_out"] = model(x).numpy().copy()
    for name, (conv, bn) in _pairs(model).items():
        fused = fuse_conv_bn_eval(conv, bn)
        out[f"fused/{name}/weight"] = fused.weight.detach().numpy().copy()
        out[f"fused/{name}/bias"] = fused.bias.detach().numpy().copy()
    export_precise_bn_fixture.record_update_bn(model, BATCH_SIZES, IMAGE, out)
    meta = {
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "command": COMMAND,
        "scenario": "fuse_conv_bn_eval per pair and swa_utils.update_bn on a small ResNet",
        "config": {
            "seed": SEED,
            "batch_sizes": list(BATCH_SIZES),
            "image_chw": list(IMAGE),
            "model": "stem conv3x3-bn; layer1 2x BasicBlock(4); layer2 BasicBlock(4->8, s2, "
            "downsample conv1x1-bn(eps=1e-3)); mean(HW); fc(8->3); convs without bias",
            "downsample_eps": DOWNSAMPLE_EPS,
            "env": _ENV,
        },
        "layout": {
            "state/<key>": "state_dict (torch names, OIHW kernels, fc weight (out, in))",
            "x": "eval input, NCHW float32",
            "eval_out": "model(x) in eval mode",
            "fused/<conv>/weight|bias": "fuse_conv_bn_eval(conv, bn), OIHW",
            "batch_<i>": "i-th update_bn batch, NCHW float32",
            "after/<key>": "state_dict after update_bn(batches, model)",
        },
    }
    out["__meta__"] = np.asarray(json.dumps(meta, sort_keys=True))
    return out


if __name__ == "__main__":
    export_precise_bn_fixture.main(build, __doc__, compressed=True)
