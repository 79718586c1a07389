"""The fixture's small ResNet three ways (linen, nnx, functional) for the deployment tests.

`scripts/export_resnet_deploy_fixture.py` defines the PyTorch model: a stem
conv-bn-relu, `layer1` with two BasicBlocks 4->4, `layer2` with one BasicBlock 4->8
(stride 2, downsample conv1x1 - BatchNorm(eps=1e-3)), a mean over H, W and a Linear.
Convolutions have no bias, as in torchvision. Here the same model is NHWC:

- `LinenResNet(scan=False)`: blocks `layer1_0`, `layer1_1`, `layer2_0` (under
  `nn.remat` with `remat=True`);
  `LinenResNet(scan=True)`: `layer1`'s two blocks run with `nn.scan` (stacked
  variables under `layer1`);
- `NnxResNet`: `layer1` and `layer2` are `nnx.List`s of blocks;
- `functional_resnet(params, batch_stats, x, bn)`: plain trees shaped like the
  unscanned linen variables, every BatchNorm through `bn`.

`load_*` put the fixture's `state/` (or `after/`) state_dict into each.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import FIXTURES, HI, fixture_arrays
from flax import nnx

import bnjax
import bnjax.linen
import bnjax.nnx

FIXTURE = FIXTURES / "resnet_deploy.npz"
PAD1 = ((1, 1), (1, 1))
DOWN_EPS = 1e-3
# (block name, c_in, c_out, stride) in call order.
BLOCKS = (("layer1_0", 4, 4, 1), ("layer1_1", 4, 4, 1), ("layer2_0", 4, 8, 2))


def fixture() -> dict[str, np.ndarray]:
    return fixture_arrays(FIXTURE.name)


def x_nhwc(arrays: dict[str, np.ndarray], key: str = "x") -> jax.Array:
    return jnp.asarray(arrays[key].transpose(0, 2, 3, 1))


# --- torch state_dict -> the unscanned linen / functional trees.


def torch_to_trees(arrays: dict[str, np.ndarray], prefix: str = "state/"):
    """`(params, batch_stats)` nested by module name, kernels HWIO / (in, out)."""
    params: dict = {}
    stats: dict = {}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split(".")
        if parts[0] in ("layer1", "layer2"):
            parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
        if parts[-3:-1] == ["downsample", "0"] or parts[-3:-1] == ["downsample", "1"]:
            parts = [*parts[:-3], "down_conv" if parts[-2] == "0" else "down_bn", parts[-1]]
        *path, leaf = parts
        is_conv = path[-1].startswith(("conv", "down_conv")) or path[-1] == "fc"
        if leaf in ("running_mean", "running_var", "num_batches_tracked"):
            tree, v = stats, jnp.asarray(value, jnp.int32 if leaf[0] == "n" else jnp.float32)
        elif is_conv and leaf == "weight":
            tree, leaf = params, "kernel"
            v = jnp.asarray(value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T)
        else:
            tree, v = params, jnp.asarray(value)
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return params, stats


def linen_variables(arrays, *, scan: bool, prefix: str = "state/"):
    params, stats = torch_to_trees(arrays, prefix)
    if scan:
        for tree in (params, stats):
            blocks = [tree.pop("layer1_0"), tree.pop("layer1_1")]
            tree["layer1"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
    return {"params": params, "batch_stats": stats}


# --- linen.


class LinenBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        h = nn.Conv(self.features, (3, 3), s, PAD1, use_bias=False, precision=HI, name="conv1")(x)
        h = nn.relu(bnjax.linen.BatchNorm(name="bn1")(h, train=train))
        h = nn.Conv(
            self.features, (3, 3), padding=PAD1, use_bias=False, precision=HI, name="conv2"
        )(h)
        h = bnjax.linen.BatchNorm(name="bn2")(h, train=train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features, (1, 1), s, "VALID", use_bias=False, precision=HI, name="down_conv"
            )(x)
            x = bnjax.linen.BatchNorm(epsilon=DOWN_EPS, name="down_bn")(x, train=train)
        return nn.relu(h + x)


class _ScanBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        return LinenBlock(self.features, name="block")(x, train), None


class LinenResNet(nn.Module):
    scan: bool = False
    reports_in_scan: bool = True  # list bnjax.linen.REPORTS in nn.scan's variable_axes
    remat: bool = False  # run the unscanned blocks under nn.remat

    @nn.compact
    def __call__(self, x, train: bool):
        Block = nn.remat(LinenBlock, static_argnums=(2,)) if self.remat else LinenBlock
        h = nn.Conv(4, (3, 3), padding=PAD1, use_bias=False, precision=HI, name="conv1")(x)
        h = nn.relu(bnjax.linen.BatchNorm(name="bn1")(h, train=train))
        if self.scan:
            blocks = nn.scan(
                _ScanBlock,
                variable_axes={
                    "params": 0,
                    "batch_stats": 0,
                    **({bnjax.linen.REPORTS: 0} if self.reports_in_scan else {}),
                },
                split_rngs={"params": True},
                length=2,
                in_axes=nn.broadcast,
            )
            h, _ = blocks(4, name="layer1")(h, train)
        else:
            h = Block(4, name="layer1_0")(h, train)
            h = Block(4, name="layer1_1")(h, train)
        h = Block(8, stride=2, name="layer2_0")(h, train)
        return nn.Dense(3, precision=HI, name="fc")(h.mean(axis=(1, 2)))


def scan_to_unrolled(tree):
    """A scanned model's tree (`layer1/block/...` stacked) as the unrolled names."""
    tree = dict(tree)
    stacked = tree.pop("layer1")["block"]
    for i in range(2):
        tree[f"layer1_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return tree


# --- nnx.


class NnxBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
        s = (stride, stride)
        conv = dict(use_bias=False, precision=HI, rngs=rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), s, padding=PAD1, **conv)
        self.bn1 = bnjax.nnx.BatchNorm(c_out)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding=PAD1, **conv)
        self.bn2 = bnjax.nnx.BatchNorm(c_out)
        self.down_conv = self.down_bn = nnx.data(None)
        if stride != 1 or c_in != c_out:
            self.down_conv = nnx.Conv(c_in, c_out, (1, 1), s, padding="VALID", **conv)
            self.down_bn = bnjax.nnx.BatchNorm(c_out, epsilon=DOWN_EPS)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.down_conv is not None:
            x = self.down_bn(self.down_conv(x))
        return nnx.relu(h + x)


class NnxResNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding=PAD1, use_bias=False, precision=HI, rngs=rngs)
        self.bn1 = bnjax.nnx.BatchNorm(4)
        self.layer1 = nnx.List([NnxBlock(4, 4, 1, rngs), NnxBlock(4, 4, 1, rngs)])
        self.layer2 = nnx.List([NnxBlock(4, 8, 2, rngs)])
        self.fc = nnx.Linear(8, 3, precision=HI, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        for block in [*self.layer1, *self.layer2]:
            h = block(h)
        return self.fc(h.mean(axis=(1, 2)))


def nnx_resnet(arrays, prefix: str = "state/") -> NnxResNet:
    """An `NnxResNet` holding the fixture's state (in training mode, as built)."""
    model = NnxResNet(nnx.Rngs(0))
    params, stats = torch_to_trees(arrays, prefix)

    blocks = {"layer1_0": model.layer1[0], "layer1_1": model.layer1[1], "layer2_0": model.layer2[0]}
    for name in params:
        child = blocks.get(name, getattr(model, name, None))
        subtrees = {name: (params[name], stats.get(name, {}))}
        if name in blocks:
            subtrees = {k: (params[name][k], stats[name].get(k, {})) for k in params[name]}
        for sub, (p, s) in subtrees.items():
            module = getattr(child, sub) if name in blocks else child
            for leaf, v in {**p, **s}.items():
                getattr(module, leaf)[...] = v
    return model


class _StackLayer(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 3, precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3)

    def __call__(self, x):
        return nnx.relu(self.bn(self.lin(x)))


class NnxStack(nnx.Module):
    """Two Linear -> BatchNorm -> relu layers stacked by `nnx.vmap`, run by `nnx.scan`."""

    def __init__(self):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return _StackLayer(rngs)

        self.layers = make(nnx.Rngs(0))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


# --- functional.


def _conv(p, x, stride, padding):
    y = jax.lax.conv_general_dilated(
        x,
        p["kernel"],
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HI,
    )
    return y + p["bias"] if "bias" in p else y


def functional_resnet(params, batch_stats, x, bn=bnjax.apply, *, train: bool = False):
    """The ResNet as a pure function: `(logits, new_batch_stats)`."""
    new = {}

    def norm(path, h, **config):
        p, s = params, batch_stats
        for k in path:
            p, s = p[k], s[k]
        y, s_new = bn(p, s, h, train, **config)
        node = new
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = s_new
        return y

    h = nn.relu(norm(("bn1",), _conv(params["conv1"], x, 1, PAD1)))
    for name, *_, stride in BLOCKS:
        p = params[name]
        y = nn.relu(norm((name, "bn1"), _conv(p["conv1"], h, stride, PAD1)))
        y = norm((name, "bn2"), _conv(p["conv2"], y, 1, PAD1))
        if "down_conv" in p:
            h = norm((name, "down_bn"), _conv(p["down_conv"], h, stride, "VALID"), eps=DOWN_EPS)
        h = nn.relu(y + h)
    logits = (
        jnp.dot(h.mean(axis=(1, 2)), params["fc"]["kernel"], precision=HI) + params["fc"]["bias"]
    )
    return logits, new


# conv -> BatchNorm pairs: torch's conv name, and the linen/functional paths.
PAIRS = {
    "conv1": (("conv1",), ("bn1",)),
    **{
        f"{tname}.{k}": ((name, k), (name, b))
        for tname, name in (
            ("layer1.0", "layer1_0"),
            ("layer1.1", "layer1_1"),
            ("layer2.0", "layer2_0"),
        )
        for k, b in (("conv1", "bn1"), ("conv2", "bn2"))
    },
    "layer2.0.downsample.0": (("layer2_0", "down_conv"), ("layer2_0", "down_bn")),
}
