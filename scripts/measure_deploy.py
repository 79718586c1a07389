"""Print the numbers quoted in docs/deployment.md: bnjax.deploy on the fixture's ResNet.

Usage (CPU, no torch needed; reads tests/fixtures/resnet_deploy.npz):

    python scripts/measure_deploy.py

For the small ResNet of `scripts/export_resnet_deploy_fixture.py` as a linen model
(plain and with `nn.scan`), an nnx model and a functional model (`tests/deploy_models.py`):

- fold: the largest difference of the folded kernels and biases from PyTorch's
  `fuse_conv_bn_eval`, and of the folded model's logits from PyTorch's eval output;
- precise_bn(pooled=False): the largest absolute difference of the running statistics
  from `torch.optim.swa_utils.update_bn`;
- precise_bn(pooled=True): the stem BatchNorm's statistics against a float64 NumPy
  pooled reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's bnjax and test models

import test_precise_bn_models as pbn  # noqa: E402
from deploy_models import (  # noqa: E402
    PAIRS,
    LinenResNet,
    fixture,
    functional_resnet,
    linen_variables,
    nnx_resnet,
    scan_to_unrolled,
    torch_to_trees,
    x_nhwc,
)

from bnjax import deploy  # noqa: E402


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def fold_errors(arrays) -> dict[str, tuple[float, float]]:
    x = x_nhwc(arrays)
    out = {}
    for kind in ("linen", "linen-scan", "nnx", "functional"):
        if kind.startswith("linen"):
            scan = kind == "linen-scan"
            folded = deploy.fold(
                LinenResNet(scan=scan), linen_variables(arrays, scan=scan), x, train=False
            )
            params = folded.variables["params"]
            params = scan_to_unrolled(params) if scan else params
            logits = folded.apply(folded.variables, x, train=False)
            get = lambda layer, p=params: _at(p, layer)  # noqa: E731
        elif kind == "nnx":
            model = deploy.fold(nnx_resnet(arrays), x)
            logits = model(x)
            blocks = {"layer1_0": model.layer1[0], "layer1_1": model.layer1[1]}
            blocks["layer2_0"] = model.layer2[0]

            def get(layer, m=model, blocks=blocks):
                conv = getattr(blocks[layer[0]] if layer[0] in blocks else m, layer[-1])
                return {"kernel": conv.kernel[...], "bias": conv.bias[...]}
        else:
            params, stats = torch_to_trees(arrays)
            folded = deploy.fold(
                lambda p, s, x, bn: functional_resnet(p, s, x, bn),
                params, stats, x, pairs=list(PAIRS.values()),
            )  # fmt: skip
            logits = folded.apply(folded.params, folded.batch_stats, x)[0]
            get = lambda layer, p=folded.params: _at(p, layer)  # noqa: E731
        err = 0.0
        for name, (layer, _) in PAIRS.items():
            w = arrays[f"fused/{name}/weight"].transpose(2, 3, 1, 0)
            err = max(err, float(np.abs(get(layer)["kernel"] - w).max()))
            err = max(err, float(np.abs(get(layer)["bias"] - arrays[f"fused/{name}/bias"]).max()))
        out[kind] = (err, float(np.abs(np.asarray(logits) - arrays["eval_out"]).max()))
    return out


def stats_errors() -> dict[str, tuple[float, float]]:
    out = {}
    mean64, var64 = pbn._stem_pooled_float64()
    for kind in pbn.KINDS:
        equal = pbn._run(kind, deploy.precise_bn, pooled=False)
        rel = 0.0
        for path, expected in jax.tree_util.tree_leaves_with_path(pbn.TORCH_AFTER):
            if path[-1].key == "num_batches_tracked":
                continue
            got = np.asarray(_at(equal, [k.key for k in path]), np.float64)
            rel = max(rel, float(np.max(np.abs(got - expected))))
        pooled = pbn._run(kind, deploy.precise_bn, pooled=True)["bn1"]
        rel64 = max(
            float(np.max(np.abs(np.asarray(pooled["running_mean"]) - mean64) / np.abs(mean64))),
            float(np.max(np.abs(np.asarray(pooled["running_var"]) - var64) / var64)),
        )
        out[kind] = (rel, rel64)
    return out


def main() -> None:
    arrays = fixture()
    print("fold vs torch fuse_conv_bn_eval: max |kernel, bias diff|, max |logits diff|")
    folds = fold_errors(arrays)
    for kind, (w, y) in folds.items():
        print(f"  {kind:11s} {w:.2g}  {y:.2g}")
    print("precise_bn(pooled=False) vs torch update_bn (max abs), pooled vs float64 (max rel)")
    stats = stats_errors()
    for kind, (rel, rel64) in stats.items():
        print(f"  {kind:11s} {rel:.2g}  {rel64:.2g}")
    # The lines docs/deployment.md quotes (tests/test_doc_figures.py checks them).
    w, y = (max(v[i] for v in folds.values()) for i in (0, 1))
    print(f"largest over the {len(folds)} models: fold {w:.2g}, logits {y:.2g}")
    rel, rel64 = (max(v[i] for v in stats.values()) for i in (0, 1))
    print(f"largest over the {len(stats)} models: unpooled {rel:.2g}, pooled {rel64:.2g}")


if __name__ == "__main__":
    main()
