"""Records what a set of whole models compute, to prove a redesign changed nothing.

    python scripts/behaviour_snapshot.py --save /tmp/before.npz   # on the old code
    python scripts/behaviour_snapshot.py --compare /tmp/before.npz  # on the new code

Every array (outputs in train and eval mode, new running statistics, gradients, a
two-step accumulated training step with each statistics policy, precise BN, update_bn,
folded models' outputs) of a linen ResNet-shaped model
(Batch Renormalization and ghost batches included), an nnx model and a functional model
of `bnjax.batch_norm` layers, in float32 and float64. `--compare` demands bit-identical
arrays (same dtype, same shape, same bytes) and names every one that differs.
Only the public API is used, so the script runs on both sides of a refactor.
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import bnjax  # noqa: E402
import bnjax.linen  # noqa: E402
import bnjax.nnx  # noqa: E402
from bnjax import deploy, training  # noqa: E402

OUT: dict[str, np.ndarray] = {}


def record(prefix: str, tree) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in leaves:
        if leaf is None:
            continue
        OUT[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


# --- linen: a ResNet-shaped model, one block with renorm, one with ghost batches.


class Block(nn.Module):
    features: int
    stride: int = 1
    renorm: bool = False
    ghost: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        extra = {}
        if self.renorm:
            extra["renorm"] = bnjax.Renorm(rmax=2.0, dmax=1.0)
        if self.ghost:
            extra["virtual_batch_size"] = 4
        h = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
        h = nn.relu(bnjax.linen.BatchNorm(**extra)(h, train=train))
        h = nn.Conv(self.features, (3, 3), use_bias=False)(h)
        h = bnjax.linen.BatchNorm()(h, train=train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x)
            x = bnjax.linen.BatchNorm(epsilon=1e-3)(x, train=train)
        return nn.relu(h + x)


class Net(nn.Module):
    special: bool = True  # renorm and ghost batches

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(bnjax.linen.BatchNorm(momentum=0.2)(x, train=train))
        x = Block(4)(x, train)
        x = Block(4, renorm=self.special)(x, train)
        x = Block(8, stride=2, ghost=self.special)(x, train)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def linen_case(dtype) -> None:
    tag = f"linen/{jnp.dtype(dtype).name}/"
    model = Net()
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3), dtype)
    variables = model.init(jax.random.key(1), x, train=False)
    variables = jax.tree.map(lambda v: v.astype(dtype) if v.dtype.kind == "f" else v, variables)
    params, stats = variables["params"], variables["batch_stats"]
    record(tag + "eval", model.apply(variables, x, train=False))
    y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    record(tag + "train", (y, upd["batch_stats"]))

    def loss_fn(p, s, batch):
        out, upd = model.apply(
            {"params": p, "batch_stats": s},
            batch,
            train=True,
            mutable=["batch_stats", bnjax.linen.REPORTS],
        )
        return jnp.mean(out**2), (upd["batch_stats"], None, upd[bnjax.linen.REPORTS])

    record(tag + "grad", jax.grad(lambda p: loss_fn(p, stats, x)[0])(params))
    opt = optax.sgd(0.1, momentum=0.9)
    for policy in ("micro", "corrected", "full"):
        step = jax.jit(training.make_train_step(loss_fn, opt, accum_steps=2, stats_policy=policy))
        p, s, o = params, stats, opt.init(params)
        for i in range(2):
            p, s, o, m = step(p, s, o, training.split_micro_batches(x + 0.1 * i, 2))
        record(tag + f"step/{policy}", (p, s, o, m))
    loader = [x + 0.1 * i for i in range(3)]
    record(tag + "precise", deploy.precise_bn(model, variables, loader, progress=False))
    record(tag + "update_bn", deploy.update_bn(model, variables, loader, progress=False))
    folded = deploy.fold(model, variables, x, train=False)
    record(tag + "fold", folded.apply(folded.variables, x, train=False))


# --- nnx


class NnxNet(nnx.Module):
    def __init__(self, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype, dtype=dtype)
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs, **kw)
        self.bn = bnjax.nnx.BatchNorm(4, momentum=0.3, **kw)
        self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs, **kw)
        self.bn2 = bnjax.nnx.BatchNorm(4, renorm=bnjax.Renorm(rmax=2.0, dmax=1.0), **kw)
        self.conv3 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs, **kw)
        self.bn3 = bnjax.nnx.BatchNorm(4, virtual_batch_size=4, **kw)
        self.head = nnx.Linear(4, 3, rngs=rngs, **kw)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(axis=(1, 2)))


def nnx_case(dtype) -> None:
    tag = f"nnx/{jnp.dtype(dtype).name}/"
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3), dtype)

    def fresh():
        return NnxNet(dtype, nnx.Rngs(0))

    m = fresh()
    m.eval()
    record(tag + "eval", m(x))
    m = fresh()
    m.train()
    record(tag + "train", (m(x), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))))
    m = fresh()
    m.train()
    grads = nnx.grad(lambda model: jnp.mean(model(x) ** 2))(m)
    record(tag + "grad", (nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(m))))
    loader = [x + 0.1 * i for i in range(3)]
    m = fresh()
    deploy.precise_bn(m, loader, progress=False)
    record(tag + "precise", nnx.to_pure_dict(nnx.state(m)))
    m = fresh()
    deploy.update_bn(m, loader, progress=False)
    record(tag + "update_bn", nnx.to_pure_dict(nnx.state(m)))
    m = fresh()
    m.eval()
    folded = deploy.fold(m, x)
    record(tag + "fold", folded(x))


# --- functional: bnjax.batch_norm layers, renorm and ghost batches in the core only.

LAYERS = {
    "bn0": bnjax.batch_norm(eps=1e-3),
    "bn1": bnjax.batch_norm(momentum=0.3),
    "bn_renorm": bnjax.batch_norm(renorm=bnjax.Renorm(rmax=2.0, dmax=1.0)),
    "bn_ghost": bnjax.batch_norm(virtual_batch_size=4),
}
PLAIN = ("bn0", "bn1")


def functional_init(dtype, names):
    keys = jax.random.split(jax.random.key(5), len(names) + 1)
    params, stats = {}, {}
    c_in = 3
    for k, name in zip(keys, names, strict=False):
        params["conv_" + name] = {"kernel": 0.3 * jax.random.normal(k, (3, 3, c_in, 4), dtype)}
        p, s = LAYERS[name].init(4)
        params[name] = jax.tree.map(lambda v: v.astype(dtype), p)
        stats[name] = jax.tree.map(lambda v: v.astype(dtype) if v.dtype.kind == "f" else v, s)
        c_in = 4
    params["head"] = {"kernel": jax.random.normal(keys[-1], (4, 3), dtype)}
    return params, stats


def forward(params, stats, x, bn, train, names, reports=False):
    new = {}
    for name in names:
        h = jax.lax.conv_general_dilated(
            x,
            params["conv_" + name]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if "bias" in params["conv_" + name]:
            h = h + params["conv_" + name]["bias"]
        layer = LAYERS[name]
        if bn is None:
            y, moments = layer.normalize(params[name], stats[name], h, train)
            new[name] = layer.report(moments) if reports else layer.update(stats[name], moments)
            h = y
        else:
            c = layer.config
            h, new[name] = bn(params[name], stats[name], h, train, eps=c.eps, momentum=c.momentum)
        x = jax.nn.relu(h)
    return jnp.dot(x.mean(axis=(1, 2)), params["head"]["kernel"]), new


def functional_case(dtype) -> None:
    tag = f"functional/{jnp.dtype(dtype).name}/"
    names = tuple(LAYERS)
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3), dtype)
    params, stats = functional_init(dtype, names)
    record(tag + "eval", forward(params, stats, x, None, False, names))
    record(tag + "train", forward(params, stats, x, None, True, names))

    def loss_fn(p, s, batch):
        out, new = forward(p, s, batch, None, True, names)
        _, reports = forward(p, s, batch, None, True, names, reports=True)
        return jnp.mean(out**2), (new, None, reports)

    record(tag + "grad", jax.grad(lambda p: loss_fn(p, stats, x)[0])(params))
    opt = optax.adam(1e-2)
    for policy in ("micro", "corrected", "full"):
        step = jax.jit(training.make_train_step(loss_fn, opt, accum_steps=2, stats_policy=policy))
        p, s, o = params, stats, opt.init(params)
        for i in range(2):
            p, s, o, m = step(p, s, o, training.split_micro_batches(x + 0.1 * i, 2))
        record(tag + f"step/{policy}", (p, s, o, m))
    # Whole-model tools through `bn` on the layers they supported before the redesign.
    params, stats = functional_init(dtype, PLAIN)
    loader = [x + 0.1 * i for i in range(3)]

    def apply_fn(p, s, xb, bn):
        return forward(p, s, xb, bn, True, PLAIN)[1]

    record(tag + "precise", deploy.precise_bn(apply_fn, params, stats, loader, progress=False))
    record(
        tag + "precise_unpooled",
        deploy.precise_bn(apply_fn, params, stats, loader, pooled=False, progress=False),
    )
    folded = deploy.fold(
        lambda p, s, xb, bn: forward(p, s, xb, bn, False, PLAIN),
        params,
        stats,
        x,
        pairs=[("conv_" + n, n) for n in PLAIN],
    )
    record(tag + "fold", folded.apply(folded.params, folded.batch_stats, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the arrays to this .npz")
    group.add_argument("--compare", help="compare against this .npz, bit for bit")
    args = ap.parse_args()
    for dtype in (jnp.float32, jnp.float64):
        linen_case(dtype)
        nnx_case(dtype)
        functional_case(dtype)
    if args.save:
        np.savez(args.save, **OUT)
        print(f"{len(OUT)} arrays written to {args.save}")
        return
    ref = dict(np.load(args.compare))
    bad = [k for k in sorted(set(ref) | set(OUT)) if k not in ref or k not in OUT]
    for k in sorted(set(ref) & set(OUT)):
        a, b = ref[k], OUT[k]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            bad.append(k)
    print(f"{len(OUT)} arrays compared with {len(ref)}: {len(bad)} differ")
    for k in bad[:50]:
        print("  differs:", k)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
