"""Port a ResNet-18 from PyTorch to Flax in one call, check it, and export it back.

The Flax model is written the natural Flax way (compact, Flax's automatic names
`Conv_0`, `BatchNorm_0`, `BasicBlock_3`...; NHWC) with torchvision's architecture
(BasicBlocks in 4 stages, downsample conv1x1 + BatchNorm, fc), reduced widths
(2, 4, 8, 16) to stay small. The port is four calls:

    template = bnjax.interop.flax_template(model, x, train=False)
    variables = bnjax.interop.from_torch(torch_state_dict, template)
    logits = model.apply(variables, x, train=False)
    state_dict = bnjax.interop.to_torch(variables, reference=torch_state_dict)

With torch installed the script builds the torch model (torchvision's code, in
`scripts/torch_models.py`), exports a fixture with `bnjax.testing.export_fixture`,
and loads the exported weights back with `load_state_dict(strict=True)`; without
torch (or with `--fixture`) it uses the committed `tests/fixtures/port_resnet18.npz`.
It prints what matched what, and the largest difference from PyTorch per group:

    python examples/port_resnet.py [--fixture]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import flax.linen as nn
import numpy as np
import optax

import bnjax.linen
from bnjax import interop, testing

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "port_resnet18.npz"


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.Conv(self.planes, (3, 3), self.stride, padding=1, use_bias=False)(x)
        out = nn.relu(bnjax.linen.BatchNorm()(out, train=train))
        out = nn.Conv(self.planes, (3, 3), padding=1, use_bias=False)(out)
        out = bnjax.linen.BatchNorm()(out, train=train)
        if self.stride != 1 or x.shape[-1] != self.planes:  # torch's `downsample`
            x = nn.Conv(self.planes, (1, 1), self.stride, use_bias=False)(x)
            x = bnjax.linen.BatchNorm()(x, train=train)
        return nn.relu(out + x)


class ResNet18(nn.Module):
    widths: tuple[int, ...] = (2, 4, 8, 16)
    num_classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.widths[0], (7, 7), 2, padding=3, use_bias=False)(x)
        x = nn.relu(bnjax.linen.BatchNorm()(x, train=train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, planes in enumerate(self.widths):
            x = BasicBlock(planes, 1 if i == 0 else 2)(x, train)
            x = BasicBlock(planes)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def nhwc(x):
    return x.transpose(0, 2, 3, 1)


def torch_fixture(path: Path):
    """Exports a fresh fixture from the torch ResNet; returns (fixture, torch model)."""
    import torch

    spec = importlib.util.spec_from_file_location("torch_models", ROOT / "scripts/torch_models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    net = models.ResNet()
    x, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    fixture = testing.export_fixture(
        path,
        net,
        (x,),
        loss=lambda y: torch.nn.functional.cross_entropy(y, labels),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        steps=2,
        extra={"labels": labels},
        command="python examples/port_resnet.py",
    )
    return fixture, net


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", action="store_true", help="use the committed fixture")
    args = parser.parse_args(argv)
    use_torch = not args.fixture and importlib.util.find_spec("torch") is not None
    with tempfile.TemporaryDirectory() as tmp:
        if use_torch:
            fixture, net = torch_fixture(Path(tmp) / "resnet.npz")
        else:
            fixture, net = testing.load_fixture(FIXTURE), None
    print(f"fixture: {fixture.meta['description'] or fixture.meta['module']}")

    # The port: a template from the Flax model, one call in.
    model = ResNet18()
    x = nhwc(fixture.inputs()[0])
    template = interop.flax_template(model, x, train=False)  # shapes, in call order
    variables = interop.from_torch(fixture.state_dict(), template)
    matching = interop.match_layers(fixture.state_dict(), template)
    print(f"{len(matching.pairs)} layers paired, e.g.:")
    print("\n".join(str(matching).splitlines()[:4] + ["..."]))

    # Everything PyTorch recorded: logits, running stats, gradients, 2 SGD steps.
    labels = fixture.extra("labels")
    report = testing.check_model(
        fixture,
        model,
        variables,
        loss=lambda y: optax.softmax_cross_entropy_with_integer_labels(y, labels).mean(),
        inputs=nhwc,
        optimizer=optax.sgd(0.1, momentum=0.9),
        tolerances={"train": (1e-5, 5e-5), "grads": (1e-4, 5e-4), "steps": (1e-4, 5e-4)},
    )
    diffs = {}
    for group in ("eval", "train", "state", "grads", "steps"):
        leaves = [leaf for leaf in report.leaves if leaf.path.startswith(group + "/")]
        diffs[group] = max(leaf.max_abs_diff for leaf in leaves)
        print(f"  {group:<6s} {len(leaves):>4d} arrays, largest |flax - torch| {diffs[group]:.1e}")

    # One call out: torch's keys, order, layouts and dtypes, bit for bit.
    state_dict = interop.to_torch(variables, reference=fixture.state_dict())
    exact = all(np.array_equal(state_dict[k], v) for k, v in fixture.state_dict().items())
    print(f"round trip bit-exact: {exact}; keys in torch's order: "
          f"{list(state_dict) == list(fixture.state_dict())}")  # fmt: skip
    if net is not None:
        import torch

        net.load_state_dict(interop.to_torch(variables, net, return_tensors=True), strict=True)
        net.eval()
        with torch.no_grad():
            torch_logits = net(torch.from_numpy(fixture.inputs()[0])).numpy()
        flax_logits = model.apply(variables, x, train=False)
        diffs["reloaded"] = float(np.abs(torch_logits - np.asarray(flax_logits)).max())
        print(f"torch model reloaded (strict=True): logits differ by {diffs['reloaded']:.1e}")
    return diffs


if __name__ == "__main__":
    main()
