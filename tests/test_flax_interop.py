"""`bnjax.flax_interop`: flax.linen.BatchNorm variables <-> bnjax trees.

Expected values: the input arrays themselves (renaming), the factor n / (n - 1), the
closed form relating Flax's biased and PyTorch's unbiased running variance, and the
outputs of the Flax model the variables came from.
"""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STAT_KEYS, assert_leaves_close

import bnjax
import bnjax.linen as bl
from bnjax import flax_interop as fi

KEY = jax.random.key(0)


_close = assert_leaves_close


def test_core_package_does_not_import_flax():
    code = (
        "import sys, bnjax, bnjax.flax_interop; "
        "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if 'flax' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_layer_names_and_variance_rescaling():
    rng = np.random.default_rng(0)
    scale, bias, mean = (jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(3))
    var = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    flax_params = {"scale": scale, "bias": bias}
    flax_stats = {"mean": mean, "var": var}
    params, stats = fi.from_flax(flax_params, flax_stats)
    assert sorted(params) == ["bias", "weight"]
    assert sorted(stats) == sorted(STAT_KEYS)
    _close(params, {"weight": scale, "bias": bias}, 0, 0)
    _close(stats["running_var"], var, 0, 0)  # copied unchanged without n
    assert stats["num_batches_tracked"].dtype == jnp.int32
    _, stats_n = fi.from_flax(flax_params, flax_stats, n=5, num_batches_tracked=7)
    _close(stats_n["running_var"], var * 5 / 4)
    assert int(stats_n["num_batches_tracked"]) == 7
    # Back, with and without n: the inverse.
    back_p, back_s = fi.to_flax(params, stats_n, n=5)
    _close(back_p, flax_params, 0, 0)
    _close(back_s, flax_stats)
    assert sorted(flax_stats) == ["mean", "var"]  # inputs untouched
    # The result is usable by the core as is.
    bnjax.apply(params, stats, jnp.ones((4, 3)), False)


def test_partial_affine_layers():
    stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
    params, _ = fi.from_flax({"bias": jnp.full(2, 3.0)}, stats)  # use_scale=False
    _close(params, {"weight": jnp.ones(2), "bias": jnp.full(2, 3.0)}, 0, 0)
    params, _ = fi.from_flax({"scale": jnp.full(2, 3.0)}, stats)  # use_bias=False
    _close(params, {"weight": jnp.full(2, 3.0)}, 0, 0)  # weight alone (torch bias=False)
    assert fi.from_flax({}, stats)[0] == {}
    assert fi.to_flax({}, bnjax.init(2)[1])[0] == {}


def test_bad_input():
    stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"missing keys: \['var'\]"):
        fi.from_flax({}, {"mean": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys: \['weight'\]"):
        fi.from_flax({"weight": jnp.ones(2)}, stats)
    with pytest.raises(ValueError, match="n .* >= 2"):
        fi.from_flax({}, stats, n=1)
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        fi.variables_from_flax({"params": {}})


def test_momentum_converters_are_reexported():
    assert fi.momentum_from_flax(0.99) == 0.01
    assert fi.momentum_to_flax(0.1) == 0.9


class _Net(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense -> BatchNorm, with either BatchNorm."""

    flax_bn: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        for width in (4, 3):
            x = nn.Dense(width)(x)
            if self.flax_bn:
                x = nn.BatchNorm(momentum=0.9, use_running_average=not train)(x)
            else:
                x = bl.BatchNorm(momentum=0.1)(x, train=train)
            x = nn.relu(x)
        return x


def _train_stats(model, variables, xs):
    for x in xs:
        _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **upd}
    return variables


def test_model_variables_round_trip_and_closed_form():
    """A trained Flax model's variables load into the same model built with bnjax's
    BatchNorm: eval outputs agree without rescaling; with n, the variance follows the
    closed form against bnjax trained on the same batches."""
    rng = np.random.default_rng(1)
    n, beta, steps = 8, 0.9, 3
    xs = [jnp.asarray(rng.normal(size=(n, 5)) + 1.0, jnp.float32) for _ in range(steps)]
    x_eval = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    flax_model, bnjax_model = _Net(flax_bn=True), _Net(flax_bn=False)
    flax_vars = _train_stats(flax_model, flax_model.init(KEY, xs[0], train=False), xs)

    converted = fi.variables_from_flax(flax_vars)
    assert set(converted["params"]["Dense_0"]) == {"kernel", "bias"}  # untouched
    _close(
        bnjax_model.apply(converted, x_eval, train=False),
        flax_model.apply(flax_vars, x_eval, train=False),
        rtol=1e-5,
        atol=1e-6,
    )
    _close(fi.variables_to_flax(converted), jax.tree.map(np.asarray, dict(flax_vars)), 0, 0)

    # bnjax trained on the same batches from the same start.
    ours = _train_stats(bnjax_model, fi.variables_from_flax(flax_model.init(KEY, xs[0], False)), xs)
    scaled = fi.variables_from_flax(flax_vars, n=n, num_batches_tracked=steps)
    for layer in ("BatchNorm_0", "BatchNorm_1"):
        got, want = scaled["batch_stats"][layer], ours["batch_stats"][layer]
        _close(got["running_mean"], want["running_mean"], rtol=1e-5, atol=1e-6)
        # torch_var = n/(n-1) flax_var - beta^t / (n-1)
        _close(got["running_var"] - beta**steps / (n - 1), want["running_var"], rtol=1e-5)
        assert int(got["num_batches_tracked"]) == int(want["num_batches_tracked"]) == steps
    # Per-layer n: only the named layer is rescaled.
    per_layer = fi.variables_from_flax(flax_vars, n={("BatchNorm_1",): n})
    _close(
        per_layer["batch_stats"]["BatchNorm_0"]["running_var"],
        flax_vars["batch_stats"]["BatchNorm_0"]["var"],
        0,
        0,
    )
    _close(
        per_layer["batch_stats"]["BatchNorm_1"]["running_var"],
        scaled["batch_stats"]["BatchNorm_1"]["running_var"],
        0,
        0,
    )
