"""Old names keep working for one release, warn with their replacement, and give its numbers.

CHANGELOG.md lists each under "Deprecated".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.linen
from bnjax import deploy, flax_interop, interop

X = jnp.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])


def test_interop_stat_names_is_bnjax_stat_keys():
    with pytest.warns(DeprecationWarning, match=r"interop\.STAT_NAMES .* use bnjax\.STAT_KEYS"):
        old = interop.STAT_NAMES
    assert old == bnjax.STAT_KEYS == ("running_mean", "running_var", "num_batches_tracked")
    assert "STAT_NAMES" not in interop.__all__
    with pytest.raises(AttributeError):
        interop.NO_SUCH_NAME  # noqa: B018


@pytest.mark.parametrize("name", ["momentum_from_flax", "momentum_to_flax"])
def test_flax_interop_momentum_lives_at_bnjax(name):
    with pytest.warns(DeprecationWarning, match=f"use bnjax.{name}"):
        old = getattr(flax_interop, name)
    assert old(0.9) == getattr(bnjax, name)(0.9) == pytest.approx(0.1)
    assert name not in flax_interop.__all__


def test_layer_update_is_update_stats():
    bn = bnjax.batch_norm(momentum=0.3)
    _, stats = bn.init(2)
    _, moments = bn.normalize({}, stats, X, True)
    with pytest.warns(DeprecationWarning, match="use BatchNormLayer.update_stats"):
        old = bn.update(stats, moments)
    new = bn.update_stats(stats, moments)
    jax.tree.map(np.testing.assert_array_equal, old, new)
    # PyTorch's update with momentum 0.3, from mean 0, var 1 (unbiased batch variance).
    np.testing.assert_allclose(new["running_mean"], 0.3 * np.mean(X, 0), rtol=1e-6)
    np.testing.assert_allclose(new["running_var"], 0.7 + 0.3 * np.var(X, 0, ddof=1), rtol=1e-6)


def test_batch_moments_takes_the_feature_axis():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    with pytest.warns(DeprecationWarning, match=r"batch_moments\(x, axis=\.\.\.\)"):
        old = bnjax.batch_moments(x, (0, 2))
    new = bnjax.batch_moments(x, axis=1)
    jax.tree.map(np.testing.assert_array_equal, old, new)
    ref = np.moveaxis(np.asarray(x, np.float64), 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(new.mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(new.var, ref.var(0), rtol=1e-6)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return bnjax.linen.BatchNorm()(nn.Dense(3)(x), train=train)


def test_update_bn_is_precise_bn_unpooled():
    x = jax.random.normal(jax.random.key(0), (6, 2))
    variables = Net().init(jax.random.key(1), x, train=False)
    loader = [x, 2 * x + 1, x[:4] - 3]
    with pytest.warns(DeprecationWarning, match=r"precise_bn\(\.\.\., pooled=False\)"):
        old = deploy.update_bn(Net(), variables, loader, progress=False)
    new = deploy.precise_bn(Net(), variables, loader, pooled=False, progress=False)
    jax.tree.map(np.testing.assert_array_equal, old["batch_stats"], new["batch_stats"])
    # PyTorch's update_bn: every batch weighs the same (NumPy float64).
    h = [
        np.asarray(nn.Dense(3).apply({"params": variables["params"]["Dense_0"]}, b)) for b in loader
    ]
    np.testing.assert_allclose(
        new["batch_stats"]["BatchNorm_0"]["running_mean"],
        np.mean([hb.mean(0) for hb in h], 0),
        rtol=1e-5,
    )
