"""`make_train_step` on whole models: linen (plain, `nn.scan`, `nn.remat`, `nn.vmap`),
nnx (plain, `nnx.scan`, `nnx.vmap`), and a dtype cast inside `loss_fn`.

Expected values: the stem BatchNorm normalizes the data itself, so its statistics
after a step follow from the data alone (NumPy float64); every other layer is
checked by a property, that a Flax transform does not change the numbers (a
scanned model equals the same model unrolled; a `vmap` with `axis_name` over D
devices equals one big batch, PyTorch's SyncBatchNorm).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import HI, assert_leaves_close
from flax import nnx

import bnjax.linen as bl
import bnjax.nnx as bx
from bnjax import training

K, B, HW = 2, 4, 6  # micro-batches per step, examples per micro-batch, image side
M_STEM = 0.3


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, B, HW, HW, 1)) * 2.0 + 3.0
    y = rng.integers(0, 5, size=(K, B))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def _stem_expected(x, policy, m=M_STEM):
    """float64 running statistics of the stem BatchNorm (initial mean 0, var 1)."""
    xs = np.asarray(x, np.float64).reshape(K, -1)
    if policy == "full":
        flat = xs.reshape(-1)
        return m * flat.mean(), (1 - m) + m * flat.var(ddof=1), 1
    mk = training.corrected_momentum(m, K) if policy == "corrected" else m
    mean, var = 0.0, 1.0
    for xb in xs:
        mean, var = (1 - mk) * mean + mk * xb.mean(), (1 - mk) * var + mk * xb.var(ddof=1)
    return mean, var, K


def _check_stem(stats, x, policy):
    mean, var, count = _stem_expected(x, policy)
    np.testing.assert_allclose(stats["running_mean"][...], [mean], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["running_var"][...], [var], rtol=1e-5)
    assert int(stats["num_batches_tracked"][...]) == count


def _close(a, b):
    assert_leaves_close(a, b, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- linen


class Block(nn.Module):
    """A residual block: conv-BN-relu-conv-BN (+ x), as in a ResNet BasicBlock."""

    train: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, _=None):
        bn = functools.partial(bl.BatchNorm, axis_name=self.axis_name)
        y = nn.Conv(4, (3, 3), use_bias=False, precision=HI)(x)
        y = nn.relu(bn(momentum=0.1)(y, train=self.train))
        y = nn.Conv(4, (3, 3), use_bias=False, precision=HI)(y)
        y = bn(momentum=0.2, epsilon=1e-3)(y, train=self.train)
        return nn.relu(x + y), None


class ResNet(nn.Module):
    """stem BN on the data, conv (stride 2) + weight-only BN, 2 blocks, pool, dense."""

    mode: str = "plain"  # "plain", "scan", "remat"
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        bn = functools.partial(bl.BatchNorm, axis_name=self.axis_name)
        x = bn(momentum=M_STEM, name="stem_bn")(x, train=True)
        x = nn.Conv(4, (3, 3), strides=2, use_bias=False, precision=HI)(x)
        x = nn.relu(bn(use_bias=False)(x, train=True))
        if self.mode == "scan":
            blocks = nn.scan(
                Block,
                variable_axes={"params": 0, "batch_stats": 0, bl.REPORTS: 0},
                split_rngs={"params": True},
                length=2,
            )
            x, _ = blocks(axis_name=self.axis_name, name="blocks")(x, None)
        else:
            block = nn.remat(Block) if self.mode == "remat" else Block
            for i in range(2):
                x, _ = block(axis_name=self.axis_name, name=f"blocks_{i}")(x)
        return nn.Dense(5, precision=HI)(x.mean(axis=(-3, -2)))


def _linen_loss(model):
    def loss_fn(params, stats, batch):
        x, y = batch
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, x, mutable=["batch_stats", bl.REPORTS]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (updates["batch_stats"], None, updates[bl.REPORTS])

    return loss_fn


def _stack_blocks(tree):
    """Unrolled `blocks_0`, `blocks_1` -> the scanned `blocks` (leading axis 2)."""
    tree = dict(tree)
    tree["blocks"] = jax.tree.map(
        lambda *a: jnp.stack(a), tree.pop("blocks_0"), tree.pop("blocks_1")
    )
    return tree


@functools.cache
def _linen_variables():
    return ResNet().init(jax.random.key(0), _data()[0][0])


def _run(loss_fn, params, stats, batch, policy):
    opt = optax.sgd(0.1, momentum=0.9)
    step = training.make_train_step(loss_fn, opt, accum_steps=K, stats_policy=policy)
    return jax.jit(step)(params, stats, opt.init(params), batch)[:2]


@functools.cache
def _linen_plain(policy):
    v = _linen_variables()
    return _run(_linen_loss(ResNet()), v["params"], v["batch_stats"], _data(), policy)


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.parametrize("policy", ["micro", "corrected", "full"])
def test_linen_resnet_stem_statistics_follow_the_data(policy):
    params, stats = _linen_plain(policy)
    _check_stem(stats["stem_bn"], _data()[0], policy)
    v = _linen_variables()
    assert not np.allclose(params["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"])
    counts = _counts(stats)
    assert len(counts) == 6 and set(counts) == {1 if policy == "full" else K}, counts


def _counts(stats):
    """Every BatchNorm's num_batches_tracked (all layers trained)."""
    leaves = jax.tree_util.tree_flatten_with_path(stats)[0]
    return [int(v[...]) for p, v in leaves if "num_batches_tracked" in jax.tree_util.keystr(p)]


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.parametrize("mode", ["scan", "remat"])
def test_linen_scan_and_remat_over_blocks_change_no_number(mode):
    """`nn.scan` over blocks (REPORTS scanned like batch_stats) and `nn.remat`."""
    v = _linen_variables()
    params, stats = v["params"], v["batch_stats"]
    stack = _stack_blocks if mode == "scan" else (lambda t: t)
    got = _run(_linen_loss(ResNet(mode)), stack(params), stack(stats), _data(), "full")
    expected = _linen_plain("full")
    _close(got, (stack(expected[0]), stack(expected[1])))


def test_linen_vmap_with_axis_name_is_one_big_batch():
    """`nn.vmap` over D=2 devices with synchronized BatchNorm == the unmapped model."""
    vmapped = nn.vmap(
        ResNet,
        variable_axes={"params": None, "batch_stats": None, bl.REPORTS: None},
        split_rngs={"params": False},
        in_axes=0,
        out_axes=0,
        axis_name="dev",
    )(axis_name="dev")
    v = _linen_variables()
    x, y = _data()
    sharded = (x.reshape(K, 2, B // 2, HW, HW, 1), y.reshape(K, 2, B // 2))
    got = _run(_linen_loss(vmapped), v["params"], v["batch_stats"], sharded, "full")
    _close(got, _linen_plain("full"))

    unsynced = nn.vmap(
        ResNet,
        variable_axes={"params": None, "batch_stats": None, bl.REPORTS: None},
        split_rngs={"params": False},
        axis_name="dev",
    )()
    with pytest.raises(ValueError, match=r"axis_name=.*flax#4760|flax#4760.*axis_name"):
        _run(_linen_loss(unsynced), v["params"], v["batch_stats"], sharded, "micro")


def test_linen_scan_without_reports_collection_says_what_to_do():
    """nn.scan that does not pass REPORTS: the step names the missing reports and the fix."""

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            blocks = nn.scan(
                Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=2,
            )
            x, _ = blocks(name="blocks")(x, None)
            return x.mean()

    model = Scanned()
    x = jnp.repeat(_data()[0], 4, axis=-1)  # the blocks keep 4 channels
    v = model.init(jax.random.key(0), x[0])

    def loss_fn(params, stats, xb):
        y, updates = model.apply(
            {"params": params, "batch_stats": stats}, xb, mutable=["batch_stats", bl.REPORTS]
        )
        return y, (updates["batch_stats"], None, updates.get(bl.REPORTS, {}))

    opt = optax.sgd(0.1)
    step = training.make_train_step(loss_fn, opt, accum_steps=K, stats_policy="full")
    with pytest.raises(ValueError, match=r"returned no report.*variable_axes"):
        jax.eval_shape(step, v["params"], v["batch_stats"], opt.init(v["params"]), x)


def test_linen_shared_block_carried_through_scan():
    """`variable_carry="batch_stats"`: one block's statistics updated on every iteration.

    Flax cannot create carried variables inside the scan (flax#2052), so `init` runs
    the block once unscanned under the same name; the scanned model then equals the
    shared block called twice. "full" refuses (two updates per micro-batch).
    """

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            if self.is_initializing():  # create the shared variables outside the scan
                x, _ = Block(name="block")(x)
                return x.mean()
            block = nn.scan(
                Block,
                variable_broadcast="params",
                variable_carry="batch_stats",
                variable_axes={bl.REPORTS: 0},
                split_rngs={"params": False},
                length=2,
            )
            x, _ = block(name="block")(x, None)
            return x.mean()

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = Block(name="block")
            return block(block(x)[0])[0].mean()

    x = jnp.repeat(_data()[0], 4, axis=-1)  # the blocks keep 4 channels
    v = Shared().init(jax.random.key(0), x[0])
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(
        jnp.shape, Twice().init(jax.random.key(0), x[0])
    )

    def loss(model):
        def loss_fn(params, stats, xb):
            y, updates = model.apply(
                {"params": params, "batch_stats": stats}, xb, mutable=["batch_stats", bl.REPORTS]
            )
            return y, (updates["batch_stats"], None, updates[bl.REPORTS])

        return loss_fn

    got = _run(loss(Shared()), v["params"], v["batch_stats"], x, "micro")
    _close(got, _run(loss(Twice()), v["params"], v["batch_stats"], x, "micro"))
    assert int(got[1]["block"]["BatchNorm_0"]["num_batches_tracked"]) == 2 * K
    with pytest.raises(ValueError, match="updated 2 times"):
        _run(loss(Shared()), v["params"], v["batch_stats"], x, "full")


def test_dtype_cast_inside_loss_fn():
    """A loss_fn that runs the model in bfloat16 (params and inputs cast inside it)."""
    v = _linen_variables()
    model = ResNet()

    def loss_fn(params, stats, batch):
        x, y = batch
        half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        logits, updates = model.apply(
            {"params": half, "batch_stats": stats},
            x.astype(jnp.bfloat16),
            mutable=["batch_stats", bl.REPORTS],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        return loss.mean(), (updates["batch_stats"], None, updates[bl.REPORTS])

    x, y = _data()
    params, stats = _run(loss_fn, v["params"], v["batch_stats"], (x, y), "full")
    assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(lambda a: a.dtype, v["params"])
    # The stem BatchNorm saw the bfloat16-rounded data; its statistics are float32's.
    rounded = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    _check_stem(stats["stem_bn"], rounded, "full")


# --------------------------------------------------------------------------- nnx


class NBlock(nnx.Module):
    def __init__(self, rngs, axis_name=None):
        self.conv1 = nnx.Conv(4, 4, (3, 3), use_bias=False, precision=HI, rngs=rngs)
        self.bn1 = bx.BatchNorm(4, momentum=0.1, axis_name=axis_name)
        self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, precision=HI, rngs=rngs)
        self.bn2 = bx.BatchNorm(4, momentum=0.2, epsilon=1e-3, axis_name=axis_name)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class NResNet(nnx.Module):
    def __init__(self, rngs, scan=False, axis_name=None):
        self.stem_bn = bx.BatchNorm(1, momentum=M_STEM, axis_name=axis_name)
        self.conv = nnx.Conv(1, 4, (3, 3), strides=2, use_bias=False, precision=HI, rngs=rngs)
        self.bn = bx.BatchNorm(4, use_bias=False, axis_name=axis_name)
        self.scan = scan
        if scan:

            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return NBlock(rngs, axis_name)

            self.blocks = create(rngs)
        else:
            self.blocks = nnx.List([NBlock(rngs, axis_name) for _ in range(2)])
        self.head = nnx.Linear(4, 5, precision=HI, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(self.stem_bn(x))))
        if self.scan:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def forward(x, block):
                return block(x)

            x = forward(x, self.blocks)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(x.mean(axis=(-3, -2)))


def _capture(model, x):
    return nnx.capture(model, bx.Reports)(x)


def _nnx_run(model, batch, policy, forward=_capture):
    """`forward(model, x) -> (logits, reports)`."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params, stats, batch):
        x, y = batch
        m = nnx.merge(graphdef, params, stats)
        logits, reports = forward(m, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (nnx.state(m, nnx.BatchStat), None, reports)

    return _run(loss_fn, params, stats, batch, policy)


@functools.cache
def _nnx_plain(policy):
    return _nnx_run(NResNet(nnx.Rngs(0)), _data(), policy)


@pytest.mark.parametrize("policy", ["micro", "full"])
def test_nnx_resnet_stem_statistics_follow_the_data(policy):
    _, stats = _nnx_plain(policy)
    _check_stem(stats["stem_bn"], _data()[0], policy)
    counts = _counts(stats)
    assert len(counts) == 6 and set(counts) == {1 if policy == "full" else K}, counts


@pytest.mark.slow  # over 20 s on 2 cores
def test_nnx_scan_over_blocks_changes_no_number():
    plain_model, scan_model = NResNet(nnx.Rngs(0)), NResNet(nnx.Rngs(0), scan=True)
    # The same weights: copy the unrolled blocks into the stacked ones.
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(b) for b in plain_model.blocks))
    nnx.update(scan_model.blocks, stacked)
    for name in ("stem_bn", "conv", "bn", "head"):
        nnx.update(getattr(scan_model, name), nnx.state(getattr(plain_model, name)))
    params, stats = _nnx_run(scan_model, _data(), "full")
    expected = _nnx_plain("full")

    def restack(tree):
        tree = nnx.to_pure_dict(tree)
        blocks = tree.pop("blocks")
        tree["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *(blocks[i] for i in sorted(blocks)))
        return tree

    _close(
        (nnx.to_pure_dict(params), nnx.to_pure_dict(stats)),
        jax.tree.map(lambda t: t, (restack(expected[0]), restack(expected[1]))),
    )


def test_nnx_vmap_with_axis_name_is_one_big_batch():
    model = NResNet(nnx.Rngs(0), axis_name="dev")

    # Capture inside the vmapped function; synchronized reports are not mapped.
    @nnx.vmap(in_axes=(None, 0), out_axes=(0, None), axis_name="dev")
    def forward(model, x):
        return nnx.capture(model, bx.Reports)(x)

    x, y = _data()
    sharded = (x.reshape(K, 2, B // 2, HW, HW, 1), y.reshape(K, 2, B // 2))
    params, stats = _nnx_run(model, sharded, "full", forward=forward)
    expected = _nnx_plain("full")
    _close(
        (nnx.to_pure_dict(params), nnx.to_pure_dict(stats)),
        (nnx.to_pure_dict(expected[0]), nnx.to_pure_dict(expected[1])),
    )

    unsynced = NResNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match="flax#4760"):
        _nnx_run(unsynced, sharded, "micro", forward=forward)
