"""`bnjax.linen.BatchNorm`: the same numbers as `bnjax.apply`, under Flax's transforms.

Expected values come from the functional core (which tests/test_core.py holds to a
NumPy float64 reference), from closed forms, or from `flax.linen.BatchNorm` itself
where the two conventions agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_leaves_close, drifting_batch, fixture_arrays
from flax.training import train_state

import bnjax
import bnjax.linen as bl

KEY = jax.random.key(0)


_close = assert_leaves_close
_batch = drifting_batch


# Several configurations: layouts, affine / tracking on and off, cumulative momentum,
# several feature axes, a mask.
CONFIGS = [
    dict(shape=(6, 5, 3), kw=dict()),
    dict(shape=(4, 3, 5, 2), kw=dict(axis=1, momentum=None, epsilon=1e-3)),
    dict(shape=(8, 4), kw=dict(affine=False, momentum=0.3)),
    dict(shape=(8, 4), kw=dict(track_running_stats=False)),
    dict(shape=(4, 3, 2, 5), kw=dict(axis=(1, 3), num_features=(3, 5))),
    dict(shape=(5, 6, 3), kw=dict(momentum=0.5), mask=True),
]


def _cfg_id(cfg):
    return str(cfg["kw"]) + ("+mask" if "mask" in cfg else "")


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_module_equals_functional_core(cfg):
    """3 training steps then 1 eval step: outputs, statistics and gradients == core."""
    rng = np.random.default_rng(0)
    kw, shape = cfg["kw"], cfg["shape"]
    module = bl.BatchNorm(**kw)
    variables = module.init(KEY, _batch(rng, shape, 0), train=False)
    axes = kw.get("axis", -1)
    axes = (axes,) if isinstance(axes, int) else axes
    features = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
    params, stats = bnjax.init(
        features,
        affine=kw.get("affine", True),
        track_running_stats=kw.get("track_running_stats", True),
    )
    _close(dict(variables.get("params", {})), params)
    _close(dict(variables.get("batch_stats", {})), stats)
    if params:  # non-trivial affine parameters, the same on both sides
        params = {
            "weight": jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=features), jnp.float32),
        }
    core_kw = dict(
        momentum=kw.get("momentum", 0.1), eps=kw.get("epsilon", 1e-5), axis=kw.get("axis", -1)
    )

    def module_loss(p, x, s, mask, g, train):
        y, upd = module.apply(
            {"params": p, "batch_stats": s}, x, train=train, mask=mask, mutable=["batch_stats"]
        )
        return jnp.sum(y * g), (y, dict(upd.get("batch_stats", {})))

    def core_loss(p, x, s, mask, g, train):
        y, new = bnjax.apply(p, s, x, train, mask=mask, **core_kw)
        return jnp.sum(y * g), (y, new)

    # One jit per configuration and mode; `train` is static.
    module_step, core_step = (
        jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True), static_argnames="train")
        for f in (module_loss, core_loss)
    )
    mod_stats = stats
    for step, train in enumerate([True, True, True, False]):
        x = _batch(rng, shape, step + 1)
        g = jnp.asarray(rng.normal(size=shape), jnp.float32)
        mask = None
        if "mask" in cfg:
            mask = jnp.asarray(rng.uniform(size=shape[:-1]) < 0.7)
        (_, (y_m, mod_stats)), grads_m = module_step(params, x, mod_stats, mask, g, train=train)
        (_, (y_c, stats)), grads_c = core_step(params, x, stats, mask, g, train=train)
        _close(y_m, y_c)
        _close(mod_stats, stats)
        _close(grads_m, grads_c)
    if stats:
        assert int(mod_stats["num_batches_tracked"]) == 3


def test_init_leaves_statistics_untouched_and_infers_num_features():
    x = _batch(np.random.default_rng(1), (4, 7), 0)
    variables = bl.BatchNorm().init(KEY, x, train=True)
    _, stats = bnjax.init(7)
    _close(dict(variables["batch_stats"]), stats)
    assert variables["params"]["weight"].shape == (7,)


def test_dtypes():
    """`y` has x's dtype (or `dtype`); params have `param_dtype`; statistics are float32."""
    x = _batch(np.random.default_rng(9), (6, 3), 1).astype(jnp.bfloat16)
    variables = bl.BatchNorm(param_dtype=jnp.bfloat16).init(KEY, x, train=False)
    assert variables["params"]["weight"].dtype == jnp.bfloat16
    assert variables["batch_stats"]["running_var"].dtype == jnp.float32
    y, upd = bl.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert upd["batch_stats"]["running_var"].dtype == jnp.float32
    y32 = bl.BatchNorm(dtype=jnp.float32).apply(variables, x, train=False)
    assert y32.dtype == jnp.float32


def test_use_running_average_compatibility():
    """Flax's spelling (attribute or call) selects the same computations as `train`."""
    rng = np.random.default_rng(2)
    x = _batch(rng, (6, 3), 1)
    variables = bl.BatchNorm().init(KEY, x, train=False)
    y_t, u_t = bl.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
    y_a, u_a = bl.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    y_c, u_c = bl.BatchNorm().apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    _close((y_a, u_a), (y_t, u_t))
    _close((y_c, u_c), (y_t, u_t))
    y_eval = bl.BatchNorm(use_running_average=True).apply(variables, x)
    _close(y_eval, bl.BatchNorm().apply(variables, x, train=False))


def test_side_by_side_with_flax_batchnorm():
    """Momentum converted: same training outputs and means; the running variance
    differs by n / (n - 1) in every update, in closed form."""
    rng = np.random.default_rng(3)
    shape = (4, 5, 3)  # n = 20 values per feature
    n = 20
    beta = bnjax.momentum_to_flax(0.1)
    ours = bl.BatchNorm(momentum=0.1)
    theirs = nn.BatchNorm(momentum=beta, epsilon=1e-5)
    x0 = _batch(rng, shape, 0)
    v_ours = ours.init(KEY, x0, train=False)
    v_theirs = theirs.init(KEY, x0, use_running_average=True)
    prev_ours, prev_theirs = v_ours["batch_stats"], v_theirs["batch_stats"]
    for t in range(1, 4):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)  # centred: Flax's fast var
        y_ours, upd = ours.apply(v_ours, x, train=True, mutable=["batch_stats"])
        y_theirs, upd_f = theirs.apply(
            v_theirs, x, use_running_average=False, mutable=["batch_stats"]
        )
        v_ours = {**v_ours, **upd}
        v_theirs = {**v_theirs, **upd_f}
        s, f = upd["batch_stats"], upd_f["batch_stats"]
        _close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
        _close(s["running_mean"], f["mean"], rtol=1e-5, atol=1e-6)
        # Each update adds (1 - beta) * var_batch, unbiased (ours) or biased (Flax).
        step_ours = s["running_var"] - beta * prev_ours["running_var"]
        step_theirs = f["var"] - beta * prev_theirs["var"]
        _close(step_ours, n / (n - 1) * step_theirs, rtol=1e-5, atol=1e-6)
        # Closed form from the common start var = 1.
        _close(s["running_var"], n / (n - 1) * f["var"] + beta**t * (1 - n / (n - 1)), rtol=1e-5)
        prev_ours, prev_theirs = s, f


def test_vmap_axis_name_syncs_statistics_across_the_mapped_axis():
    """4 shards under nn.vmap with axis_name == one BatchNorm over the full batch."""
    rng = np.random.default_rng(4)
    x = _batch(rng, (4, 6, 3), 1)
    VBN = nn.vmap(
        bl.BatchNorm,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        in_axes=(0, None),
        axis_name="batch",
    )
    module = VBN(axis_name="batch")
    variables = module.init(KEY, x, False)
    y, upd = jax.jit(lambda v, x: module.apply(v, x, True, mutable=["batch_stats"]))(variables, x)
    params, stats = bnjax.init(3)
    y_full, stats_full = bnjax.apply(params, stats, x.reshape(24, 3), True)
    _close(y.reshape(24, 3), y_full, rtol=1e-5, atol=1e-5)
    _close(dict(upd["batch_stats"]), stats_full, rtol=1e-5, atol=1e-6)
    # Without axis_name each shard has its own statistics: they differ.
    local = nn.vmap(
        bl.BatchNorm,
        variable_axes={"params": None, "batch_stats": 0},
        split_rngs={"params": False},
        in_axes=(0, None),
    )()
    y_local, _ = jax.jit(lambda v, x: local.apply(v, x, True, mutable=["batch_stats"]))(
        {
            "params": variables["params"],
            "batch_stats": jax.tree.map(lambda a: jnp.stack([a] * 4), variables["batch_stats"]),
        },
        x,
    )
    assert not np.allclose(y_local.reshape(24, 3), y_full, atol=1e-3)


def test_vmap_per_example_initialized_inside_the_map():
    """Equinox-style: vmap over single examples (1-D x); init runs under the map too."""
    x = _batch(np.random.default_rng(10), (8, 3), 1)
    module = nn.vmap(
        bl.BatchNorm,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        in_axes=(0, None),
        axis_name="batch",
    )(axis_name="batch")
    variables = module.init(KEY, x, True)
    _close(dict(variables["batch_stats"]), bnjax.init(3)[1])
    y, upd = jax.jit(lambda v, x: module.apply(v, x, True, mutable=["batch_stats"]))(variables, x)
    y_full, stats_full = bnjax.apply(*bnjax.init(3), x, True)
    _close(y, y_full, rtol=1e-5, atol=1e-5)
    _close(dict(upd["batch_stats"]), stats_full, rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    """BN-relu with a carry, for nn.scan."""

    @nn.compact
    def __call__(self, x, train):
        return nn.relu(bl.BatchNorm()(x, train=train)), None


def test_scan_over_stacked_layers():
    x = _batch(np.random.default_rng(5), (8, 3), 1)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            scan = nn.scan(
                _Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=3,
                in_axes=nn.broadcast,
            )
            return scan()(x, train)[0]

    variables = Stack().init(KEY, x, False)
    y, upd = Stack().apply(variables, x, True, mutable=["batch_stats"])
    (scanned,) = upd["batch_stats"].values()  # the lifted module's auto-name
    stacked = scanned["BatchNorm_0"]
    h = x
    for layer in range(3):
        p, s = bnjax.init(3)
        h, s = bnjax.apply(p, s, h, True)
        h = jax.nn.relu(h)
        _close(jax.tree.map(lambda a, layer=layer: a[layer], dict(stacked)), s)
    _close(y, h)


@pytest.mark.parametrize("lift", ["remat", "jit"])
def test_remat_and_jit_lifted_modules(lift):
    rng = np.random.default_rng(6)
    x = _batch(rng, (6, 3), 1)
    g = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    wrap = nn.remat if lift == "remat" else nn.jit
    module = wrap(bl.BatchNorm, static_argnums=(2,))()
    variables = module.init(KEY, x, False)

    def loss(p):
        y, upd = module.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            x,
            True,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * g), upd["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(variables["params"])
    params, core_stats = bnjax.init(3)
    core_grads, core_stats = jax.grad(
        lambda p: (lambda y, s: (jnp.sum(y * g), s))(*bnjax.apply(p, core_stats, x, True)),
        has_aux=True,
    )(params)
    _close(dict(grads), core_grads)
    _close(dict(stats), core_stats)


def test_train_state_loop_equals_functional_loop():
    """A TrainState-style jitted loop (Dense -> BN) == the same loop on the core."""
    rng = np.random.default_rng(7)
    xs = [_batch(rng, (8, 5), s) for s in range(3)]
    ts = [jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(3)]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return bl.BatchNorm()(nn.Dense(4)(x), train=train)

    class TrainState(train_state.TrainState):
        batch_stats: dict

    model = Net()
    variables = model.init(KEY, xs[0], train=False)
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
    )

    @jax.jit
    def step(state, x, t):
        def loss_fn(p):
            y, upd = state.apply_fn(
                {"params": p, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((y - t) ** 2), upd["batch_stats"]

        grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads).replace(batch_stats=stats)

    # The same model on the core, from the same initial values.
    dense = variables["params"]["Dense_0"]
    params = {"dense": dict(dense), "bn": dict(variables["params"]["BatchNorm_0"])}
    stats = dict(variables["batch_stats"]["BatchNorm_0"])
    opt_state = tx.init(params)

    def core_loss(p, s, x, t):
        y, s = bnjax.apply(p["bn"], s, x @ p["dense"]["kernel"] + p["dense"]["bias"], True)
        return jnp.mean((y - t) ** 2), s

    core_grad = jax.jit(jax.grad(core_loss, has_aux=True))
    for x, t in zip(xs, ts, strict=True):
        state = step(state, x, t)
        grads, stats = core_grad(params, stats, x, t)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    _close(dict(state.params["Dense_0"]), params["dense"], rtol=1e-5, atol=1e-6)
    _close(dict(state.params["BatchNorm_0"]), params["bn"], rtol=1e-5, atol=1e-6)
    _close(dict(state.batch_stats["BatchNorm_0"]), stats, rtol=1e-5, atol=1e-6)
    assert int(state.batch_stats["BatchNorm_0"]["num_batches_tracked"]) == 3


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def trained():
    x = _batch(np.random.default_rng(8), (6, 3), 1)
    return x, bl.BatchNorm().init(KEY, x, train=False)


def test_training_without_mutable_batch_stats_says_how(trained):
    x, variables = trained
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        bl.BatchNorm().apply(variables, x, train=True)


def test_missing_or_misnamed_batch_stats_collection(trained):
    x, variables = trained
    with pytest.raises(ValueError, match="no 'running_mean' in the 'batch_stats' collection"):
        bl.BatchNorm().apply({"params": variables["params"]}, x, train=False)
    misnamed = {"params": variables["params"], "batch_stat": variables["batch_stats"]}
    with pytest.raises(ValueError, match=r"collections: \['batch_stat', 'params'\]"):
        bl.BatchNorm().apply(misnamed, x, train=False)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        bl.BatchNorm().apply(variables, x, train=True, mutable=["batch_stat"])


def test_unknown_variables_in_a_collection_get_the_core_key_error(trained):
    """E.g. a flax.linen.BatchNorm checkpoint loaded into the bnjax module."""
    x, variables = trained
    stats = {**variables["batch_stats"], "mean": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys: \['mean'\].*flax_interop"):
        bl.BatchNorm().apply({**variables, "batch_stats": stats}, x, train=False)
    flax_params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"missing keys: \['weight'\]"):
        bl.BatchNorm().apply({**variables, "params": flax_params}, x, train=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bl.BatchNorm(track_running_stats=False).apply(variables, x, train=False)


def test_wrong_feature_size_on_reuse(trained):
    x, variables = trained
    with pytest.raises(ValueError, match=r"3 features .* has 4 features"):
        bl.BatchNorm().apply(variables, jnp.ones((6, 4)), train=False)
    with pytest.raises(ValueError, match=r"3 features .* has 4 features"):
        bl.BatchNorm(num_features=3).init(KEY, jnp.ones((6, 4)), train=False)


def test_traced_train_is_a_type_error(trained):
    x, variables = trained
    f = jax.jit(lambda t: bl.BatchNorm().apply(variables, x, train=t, mutable=True))
    with pytest.raises(TypeError, match="static"):
        f(True)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda u: bl.BatchNorm().apply(variables, x, use_running_average=u))(True)


def test_missing_mode_and_bad_hyperparameters(trained):
    x, variables = trained
    with pytest.raises(ValueError, match="pass `train=True`"):
        bl.BatchNorm().apply(variables, x)
    with pytest.raises(ValueError, match="momentum_from_flax"):
        bl.BatchNorm(momentum=1.5).apply(variables, x, train=False)
    with pytest.raises(ValueError, match="disagree"):
        bl.BatchNorm().apply(variables, x, train=True, use_running_average=True)


# --------------------------------------------------------------------------- PyTorch fixtures

_HI = jax.lax.Precision.HIGHEST


class _SmallNet(nn.Module):
    """PyTorch's SmallNet (scripts/export_torch_fixtures.py), channels-last, in Flax."""

    @nn.compact
    def __call__(self, x, train: bool):
        for i, c in ((1, 4), (2, 8)):
            x = nn.Conv(c, (3, 3), padding=1, precision=_HI, name=f"conv{i}")(x)
            x = nn.relu(bl.BatchNorm(name=f"bn{i}")(x, train=train))
        return nn.Dense(10, precision=_HI, name="fc")(x.mean(axis=(1, 2)))


def _torch_to_flax(f, prefix, index=None, *, stats=True):
    """SmallNet's state_dict entries `prefix/<key>` (step `index` of stacked ones) ->
    `(params, batch_stats)` for `_SmallNet`: OIHW -> HWIO, (out, in) -> (in, out)."""

    def get(key):
        a = f[f"{prefix}/{key}"]
        return np.asarray(a if index is None else a[index])  # NumPy: no eager jit

    params = {
        f"conv{i}": {
            "kernel": get(f"conv{i}.weight").transpose(2, 3, 1, 0),
            "bias": get(f"conv{i}.bias"),
        }
        for i in (1, 2)
    }
    params["fc"] = {"kernel": get("fc.weight").T, "bias": get("fc.bias")}
    batch_stats = {}
    for i in (1, 2):
        if f"{prefix}/bn{i}.weight" in f:
            params[f"bn{i}"] = {k: get(f"bn{i}.{k}") for k in ("weight", "bias")}
        if stats:
            batch_stats[f"bn{i}"] = {
                "running_mean": get(f"bn{i}.running_mean"),
                "running_var": get(f"bn{i}.running_var"),
                "num_batches_tracked": get(f"bn{i}.num_batches_tracked").astype(np.int32),
            }
    return params, batch_stats


def _loss(model, params, stats, x, y, train):
    logits, upd = model.apply(
        {"params": params, "batch_stats": stats}, x, train=train, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, upd["batch_stats"])


def test_small_net_reproduces_pytorch_training_fixture():
    """Scenario c: 3 SGD-momentum steps of 4 accumulated micro-batches of 8, BN in train
    mode: logits and running statistics after every micro-batch, accumulated
    gradients and parameters after every step, all as PyTorch computed them."""
    f = fixture_arrays("c_accumulation.npz")
    model = _SmallNet()
    params, stats = _torch_to_flax(f, "sd_init")
    x = np.transpose(f["x"], (0, 2, 3, 1))  # NCHW -> NHWC, NumPy (no eager jit per slice)
    y = f["y"].astype(np.int32)
    grad_fn = jax.jit(jax.grad(lambda p, s, x, y: _loss(model, p, s, x, y, True), has_aux=True))
    tx = optax.sgd(0.1, momentum=0.9)  # torch SGD: buf = 0.9 buf + g; p -= 0.1 buf
    opt_state = tx.init(params)

    @jax.jit
    def sgd_step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for step in range(3):
        acc = jax.tree.map(np.zeros_like, params)
        for micro in range(4):
            k = step * 4 + micro
            rows = slice(8 * k, 8 * k + 8)
            grads, (logits, stats) = grad_fn(params, stats, x[rows], y[rows])
            acc = jax.tree.map(lambda a, g: a + np.asarray(g) / 4, acc, grads)
            _close(logits, f["logits"][k], rtol=1e-4, atol=1e-5)
            _, want_stats = _torch_to_flax(f, "sd_micro", k)
            _close(dict(stats), want_stats, rtol=1e-5, atol=1e-6)
        want_grads, _ = _torch_to_flax(f, "grad_step", step, stats=False)
        _close(acc, want_grads, rtol=1e-4, atol=1e-5)
        params, opt_state = sgd_step(params, opt_state, acc)
        want_params, _ = _torch_to_flax(f, "sd_step", step)
        _close(params, want_params, rtol=1e-4, atol=1e-5)


def test_small_net_reproduces_pytorch_frozen_bn_fixture():
    """Scenario d: BN in eval mode (running statistics of a pretrained net): logits
    and the gradients of the convolutions and the classifier, as PyTorch's."""
    f = fixture_arrays("d_frozen_bn.npz")
    model = _SmallNet()
    params, stats = _torch_to_flax(f, "sd_init")
    x = np.transpose(f["x"][:16], (0, 2, 3, 1))
    y = f["y"][:16].astype(np.int32)
    grads, (logits, new_stats) = jax.jit(
        jax.grad(lambda p: _loss(model, p, stats, x, y, False), has_aux=True)
    )(params)
    _close(logits, f["logits"][0], rtol=1e-4, atol=1e-5)
    _close(dict(new_stats), stats, 0, 0)
    want, _ = _torch_to_flax(f, "grad_step", 0, stats=False)
    _close({k: grads[k] for k in want}, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- weight only


def test_use_bias_false_is_pytorchs_bias_false():
    """params {"weight"} alone (PyTorch 2.13's BatchNorm2d(C, bias=False)), float64 reference."""
    from reference import ref_batchnorm

    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4, 3)), jnp.float32)
    bn = bl.BatchNorm(use_bias=False, momentum=0.2)
    variables = bn.init(jax.random.key(0), x, train=False)
    assert set(variables["params"]) == {"weight"}
    variables = {**variables, "params": {"weight": jnp.array([0.5, 1.0, 2.0])}}
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    y_ref, new_ref = ref_batchnorm(x, [0.5, 1.0, 2.0], None, stats, train=True, momentum=0.2)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        updates["batch_stats"]["running_var"], new_ref["running_var"], rtol=1e-6
    )
    assert (
        set(
            bl.BatchNorm(use_scale=False, use_bias=False)
            .init(jax.random.key(0), x, train=False)
            .get("params", {})
        )
        == set()
    )
    with pytest.raises(ValueError, match="use_scale=False with use_bias=True"):
        bl.BatchNorm(use_scale=False).init(jax.random.key(0), x, train=False)
