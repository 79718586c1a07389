"""`bnjax.nnx.BatchNorm`: the same numbers as `bnjax.apply`, with nnx's state handling.

Expected values come from the functional core (held to a NumPy float64 reference by
tests/test_core.py), from closed forms, or from `flax.nnx.BatchNorm` where the two
conventions agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_leaves_close, drifting_batch, fixture_arrays
from flax import nnx

import bnjax
import bnjax.nnx as bx

_close = assert_leaves_close
_batch = drifting_batch


def _stats(bn):
    if bn.running_mean is None:
        return {}
    return {
        "running_mean": bn.running_mean[...],
        "running_var": bn.running_var[...],
        "num_batches_tracked": bn.num_batches_tracked[...],
    }


CONFIGS = [
    dict(shape=(6, 5, 3), features=3, kw=dict()),
    dict(shape=(4, 3, 5, 2), features=3, kw=dict(axis=1, momentum=None, epsilon=1e-3)),
    dict(shape=(8, 4), features=4, kw=dict(affine=False, momentum=0.3)),
    dict(shape=(8, 4), features=4, kw=dict(track_running_stats=False)),
    dict(shape=(4, 3, 2, 5), features=(3, 5), kw=dict(axis=(1, 3))),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c["kw"]))
def test_module_equals_functional_core(cfg):
    """3 training steps, then eval(): outputs, statistics and gradients == core."""
    rng = np.random.default_rng(0)
    kw, shape, features = cfg["kw"], cfg["shape"], cfg["features"]
    bn = bx.BatchNorm(features, **kw)
    params, stats = bnjax.init(
        features,
        affine=kw.get("affine", True),
        track_running_stats=kw.get("track_running_stats", True),
    )
    _close(_stats(bn), stats)
    if params:
        params = {
            "weight": jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=features), jnp.float32),
        }
        bn.weight[...] = params["weight"]
        bn.bias[...] = params["bias"]
    core_kw = dict(
        momentum=kw.get("momentum", 0.1), eps=kw.get("epsilon", 1e-5), axis=kw.get("axis", -1)
    )

    def module_loss(bn, x, g):
        y = bn(x)
        return jnp.sum(y * g), y

    def core_loss(p, x, s, g, train):
        y, new = bnjax.apply(p, s, x, train, **core_kw)
        return jnp.sum(y * g), (y, new)

    # One jit per configuration and mode (the mode is part of nnx's static graph).
    module_step = nnx.jit(nnx.grad(module_loss, argnums=(0, 1), has_aux=True))
    core_step = jax.jit(jax.grad(core_loss, (0, 1), has_aux=True), static_argnames="train")
    for step, train in enumerate([True, True, True, False]):
        if not train:
            bn.eval()
        assert bn.training is train
        x = _batch(rng, shape, step + 1)
        g = jnp.asarray(rng.normal(size=shape), jnp.float32)
        (grads_m, dx_m), y_m = module_step(bn, x, g)
        (grads_c, dx_c), (y_c, stats) = core_step(params, x, stats, g, train=train)
        _close(y_m, y_c)
        _close(_stats(bn), stats)
        _close(dx_m, dx_c)
        if params:
            _close({"weight": grads_m["weight"][...], "bias": grads_m["bias"][...]}, grads_c)
    if stats:
        assert int(bn.num_batches_tracked[...]) == 3


def test_dtypes():
    """`y` has x's dtype (or `dtype`); params have `param_dtype`; statistics are float32."""
    x = _batch(np.random.default_rng(9), (6, 3), 1).astype(jnp.bfloat16)
    bn = bx.BatchNorm(3, param_dtype=jnp.bfloat16)
    assert bn.weight[...].dtype == jnp.bfloat16
    assert bn(x).dtype == jnp.bfloat16
    assert bn.running_var[...].dtype == jnp.float32
    assert bx.BatchNorm(3, dtype=jnp.float32)(x).dtype == jnp.float32


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(5, 4, rngs=rngs)
        self.bn = bx.BatchNorm(4)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_train_eval_switching_and_view():
    """Starts in training mode like PyTorch; train()/eval()/nnx.view switch it."""
    net = _Net(nnx.Rngs(0))
    assert net.bn.training and not net.bn.use_running_average
    net.eval()
    assert not net.bn.training
    x = _batch(np.random.default_rng(1), (6, 5), 1)
    before = _stats(net.bn)
    net(x)
    _close(_stats(net.bn), before)  # eval: statistics untouched
    net.train()
    net(x)
    assert int(net.bn.num_batches_tracked[...]) == 1
    view = nnx.view(net, use_running_average=True)
    assert not view.bn.training and net.bn.training
    # A call-time override, either spelling.
    y_eval = net.bn(x[:, :4], train=False)
    _close(net.bn(x[:, :4], use_running_average=True), y_eval)
    assert int(net.bn.num_batches_tracked[...]) == 1


def test_jit_grad_step_and_split_merge_equal_the_core():
    """nnx.jit + nnx.grad updates statistics in place; split/merge threads them
    explicitly; both equal the functional core."""
    rng = np.random.default_rng(2)
    xs = [_batch(rng, (8, 5), s) for s in range(3)]
    net = _Net(nnx.Rngs(0))
    # A copy: split shares its Variables with `net`, which grad_step updates in place.
    graphdef, params0, stats0 = nnx.split(nnx.clone(net), nnx.Param, nnx.BatchStat)

    @nnx.jit
    def grad_step(net, x):
        return nnx.grad(lambda net: jnp.sum(net(x) ** 2))(net)

    @jax.jit
    def pure_step(params, stats, x):
        def loss(params):
            net = nnx.merge(graphdef, params, stats, copy=True)
            y = net(x)
            return jnp.sum(y**2), nnx.state(net, nnx.BatchStat)

        return jax.grad(loss, has_aux=True)(params)

    lin = {"kernel": params0["linear"]["kernel"][...], "bias": params0["linear"]["bias"][...]}
    bn_params, core_stats = bnjax.init(4)

    def core_loss(lin, bn_params, s, x):
        y, s = bnjax.apply(bn_params, s, x @ lin["kernel"] + lin["bias"], True)
        return jnp.sum(y**2), s

    stats = stats0
    for x in xs:
        grads = grad_step(net, x)
        pure_grads, stats = pure_step(params0, stats, x)
        (g_lin, g_bn), core_stats = jax.grad(core_loss, (0, 1), has_aux=True)(
            lin, bn_params, core_stats, x
        )
        _close(_stats(net.bn), core_stats, rtol=1e-5)
        _close({k: v[...] for k, v in stats["bn"].items()}, core_stats, rtol=1e-5)
        for g in (grads, pure_grads):
            _close({k: g["linear"][k][...] for k in lin}, g_lin, rtol=1e-5, atol=1e-5)
            _close({k: g["bn"][k][...] for k in g_bn}, g_bn, rtol=1e-5, atol=1e-5)
    assert int(net.bn.num_batches_tracked[...]) == 3


def test_side_by_side_with_flax_nnx_batchnorm():
    """Momentum converted: same training outputs and means; the running variance of
    every update differs by n / (n - 1), in closed form."""
    rng = np.random.default_rng(3)
    n, beta = 16, bnjax.momentum_to_flax(0.1)
    ours = bx.BatchNorm(3, momentum=0.1)
    theirs = nnx.BatchNorm(3, momentum=beta, epsilon=1e-5, rngs=nnx.Rngs(0))
    for t in range(1, 4):
        x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
        _close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        _close(ours.running_mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
        expected = n / (n - 1) * theirs.var[...] + beta**t * (1 - n / (n - 1))
        _close(ours.running_var[...], expected, rtol=1e-5)


def test_vmap_axis_name_syncs_statistics():
    """nnx.vmap over 4 shards with axis_name == one BatchNorm over the full batch."""
    x = _batch(np.random.default_rng(4), (4, 6, 3), 1)
    bn = bx.BatchNorm(3, axis_name="batch")
    y = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch"))(bn, x)
    params, stats = bnjax.init(3)
    y_full, stats_full = bnjax.apply(params, stats, x.reshape(24, 3), True)
    _close(y.reshape(24, 3), y_full, rtol=1e-5, atol=1e-5)
    _close(_stats(bn), stats_full, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- errors


def test_wrong_feature_size():
    with pytest.raises(ValueError, match=r"3 features .* has 4 features"):
        bx.BatchNorm(3)(jnp.ones((5, 4)))


def test_traced_mode_is_a_type_error():
    bn = bx.BatchNorm(3)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda t: bn(jnp.ones((5, 3)), train=t))(True)
    bn.use_running_average = "yes"
    with pytest.raises(TypeError, match=r"model\.eval\(\)"):
        bn(jnp.ones((5, 3)))


def test_bad_construction():
    with pytest.raises(ValueError, match="momentum_from_flax"):
        bx.BatchNorm(3, momentum=0.99 + 1)
    with pytest.raises(ValueError, match="eps"):
        bx.BatchNorm(3, epsilon=0.0)
    with pytest.raises(ValueError, match="num_features"):
        bx.BatchNorm(0)
    with pytest.raises(ValueError, match="rngs"):
        bx.BatchNorm(3, weight_init=nnx.initializers.normal())
    bn = bx.BatchNorm(3, weight_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
    assert bn.weight[...].shape == (3,)


# --------------------------------------------------------------------------- PyTorch fixtures

_HI = jax.lax.Precision.HIGHEST


class _SmallNet(nnx.Module):
    """PyTorch's SmallNet (scripts/export_torch_fixtures.py), channels-last, in nnx."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), padding=1, precision=_HI, rngs=rngs)
        self.bn1 = bx.BatchNorm(4)
        self.conv2 = nnx.Conv(4, 8, (3, 3), padding=1, precision=_HI, rngs=rngs)
        self.bn2 = bx.BatchNorm(8)
        self.fc = nnx.Linear(8, 10, precision=_HI, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(axis=(1, 2)))


def _torch_arrays(f, prefix, index=None):
    """`{module: {name: array}}` in nnx layouts from SmallNet's state_dict entries."""
    out = {}
    for key in f:
        if not key.startswith(prefix + "/"):
            continue
        module, name = key[len(prefix) + 1 :].split(".")
        a = np.asarray(f[key] if index is None else f[key][index])  # NumPy: no eager jit
        if name == "weight" and module.startswith("conv"):
            name, a = "kernel", a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif name == "weight" and module == "fc":
            name, a = "kernel", a.T
        elif name == "num_batches_tracked":
            a = a.astype(np.int32)
        out.setdefault(module, {})[name] = a
    return out


def _load_torch_state(model, arrays):
    for module, named in arrays.items():
        for name, a in named.items():
            getattr(getattr(model, module), name).set_value(jnp.asarray(a))


def _state_arrays(model, filt):
    return {
        module: {name: v[...] for name, v in sub.items()}
        for module, sub in nnx.state(model, filt).items()
    }


def _loss(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@pytest.mark.slow  # over 20 s on 2 cores
def test_small_net_reproduces_pytorch_training_fixture():
    """Scenario c: 3 SGD-momentum steps of 4 accumulated micro-batches of 8, BN in train
    mode: logits and running statistics after every micro-batch, accumulated
    gradients and parameters after every step, as PyTorch computed them."""
    f = fixture_arrays("c_accumulation.npz")
    model = _SmallNet(nnx.Rngs(0))
    _load_torch_state(model, _torch_arrays(f, "sd_init"))
    x = np.transpose(f["x"], (0, 2, 3, 1))  # NCHW -> NHWC, NumPy (no eager jit per slice)
    y = f["y"].astype(np.int32)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def micro_step(model, x, y):
        return nnx.grad(_loss, has_aux=True)(model, x, y)

    @nnx.jit
    def apply_step(model, optimizer, grads):
        optimizer.update(model, grads)

    for step in range(3):
        acc = None
        for micro in range(4):
            k = step * 4 + micro
            rows = slice(8 * k, 8 * k + 8)
            grads, logits = micro_step(model, x[rows], y[rows])
            # Accumulated in NumPy, as torch sums .grad (no eager jit per leaf shape).
            grads = jax.tree.map(np.asarray, grads)
            acc = grads if acc is None else jax.tree.map(np.add, acc, grads)
            _close(logits, f["logits"][k], rtol=1e-4, atol=1e-5)
            want = _torch_arrays(f, "sd_micro", k)
            got = _state_arrays(model, nnx.BatchStat)
            _close(got, {m: {n: want[m][n] for n in got[m]} for m in got}, rtol=1e-5, atol=1e-6)
        want_grads = _torch_arrays(f, "grad_step", step)
        _close(
            {m: {n: v[...] / 4 for n, v in sub.items()} for m, sub in acc.items()},
            want_grads,
            rtol=1e-4,
            atol=1e-5,
        )
        apply_step(model, optimizer, jax.tree.map(lambda a: a / 4, acc))
        want = _torch_arrays(f, "sd_step", step)
        got = _state_arrays(model, nnx.Param)
        _close(got, {m: {n: want[m][n] for n in got[m]} for m in got}, rtol=1e-4, atol=1e-5)


def test_small_net_reproduces_pytorch_frozen_bn_fixture():
    """Scenario d: the BatchNorms in eval() (a pretrained net's running statistics):
    logits and the gradients of the convolutions and the classifier, as PyTorch's."""
    f = fixture_arrays("d_frozen_bn.npz")
    model = _SmallNet(nnx.Rngs(0))
    _load_torch_state(model, _torch_arrays(f, "sd_init"))
    model.bn1.eval()
    model.bn2.eval()
    before = _state_arrays(model, nnx.BatchStat)
    x = np.transpose(f["x"][:16], (0, 2, 3, 1))
    y = f["y"][:16].astype(np.int32)
    grads, logits = nnx.jit(nnx.grad(_loss, has_aux=True))(model, x, y)
    _close(logits, f["logits"][0], rtol=1e-4, atol=1e-5)
    _close(_state_arrays(model, nnx.BatchStat), before, 0, 0)
    want = _torch_arrays(f, "grad_step", 0)
    _close({m: {n: grads[m][n][...] for n in want[m]} for m in want}, want, rtol=1e-4, atol=1e-5)


def test_use_bias_false_is_pytorchs_bias_false():
    """A weight and no bias (PyTorch 2.13's bias=False), against the float64 reference."""
    from reference import ref_batchnorm

    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 3)), jnp.float32)
    bn = bx.BatchNorm(3, use_bias=False, momentum=0.2)
    assert bn.bias is None and set(nnx.state(bn, nnx.Param)) == {"weight"}
    bn.weight[...] = jnp.array([0.5, 1.0, 2.0])
    y = bn(x)
    stats0 = {"running_mean": np.zeros(3), "running_var": np.ones(3), "num_batches_tracked": 0}
    y_ref, new_ref = ref_batchnorm(x, [0.5, 1.0, 2.0], None, stats0, train=True, momentum=0.2)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var[...], new_ref["running_var"], rtol=1e-6)
    with pytest.raises(ValueError, match="use_scale=False with use_bias=True"):
        bx.BatchNorm(3, use_scale=False)
