"""Precise BN never averages a non-finite batch in: it raises, or skips and says so.

`precise_bn` and `update_bn` on functional, linen and nnx models: a batch whose
BatchNorm moments are not finite raises by default (naming the batch and the
layer); with `skip_nonfinite=True` it is left out, a `RuntimeWarning` counts it, and
the statistics equal (bit for bit) those recomputed from the good batches alone.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.deploy import precise_bn, update_bn

HI = jax.lax.Precision.HIGHEST
# update_bn is deprecated (precise_bn(..., pooled=False) gives its numbers); it keeps its
# guard while it exists.
pytestmark = pytest.mark.filterwarnings(
    "ignore:bnjax.deploy.update_bn is deprecated:DeprecationWarning"
)


def _batches(bad_at=None, n=4):
    rng = np.random.default_rng(3)
    out = []
    for i, rows in enumerate((6, 6, 4, 5)[:n]):
        x = rng.normal(size=(rows, 3)) * (1 + i) + i
        if i == bad_at:
            x[1, 2] = np.nan
        out.append(jnp.asarray(x, jnp.float32))
    return out


def _without(batches, i):
    return [b for j, b in enumerate(batches) if j != i]


def _params():
    rng = np.random.default_rng(0)
    p1, s1 = bnjax.init(3)
    p2, s2 = bnjax.init(4)
    params = {"bn1": p1, "dense": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bn2": p2}
    return params, {"bn1": s1, "bn2": s2}


def _forward(params, stats, x, bn):
    """The functional model: `(outputs, new_batch_stats)` (precise_bn's signature)."""
    h, s1 = bn(params["bn1"], stats["bn1"], x, True)
    h = jax.nn.relu(jnp.dot(h, params["dense"], precision=HI))
    y, s2 = bn(params["bn2"], stats["bn2"], h, True)
    return y, {"bn1": s1, "bn2": s2}


def _stats_only(params, stats, x, bn):
    """update_bn's functional model: the new statistics alone."""
    return _forward(params, stats, x, bn)[1]


def _functional(tool, batches, **kw):
    params, stats = _params()
    if tool is update_bn:
        fn = functools.partial(_stats_only, bn=functools.partial(bnjax.apply, momentum=None))
    else:
        fn = _forward
    return tool(fn, params, stats, batches, progress=False, **kw)


def _assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tool", [precise_bn, update_bn], ids=["precise_bn", "update_bn"])
def test_functional_skips_and_counts_a_bad_batch(tool):
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 4 batches .*\(batches 1\)"):
        got = _functional(tool, _batches(bad_at=1), skip_nonfinite=True)
    expected = _functional(tool, _without(_batches(), 1))
    _assert_identical(got, expected)
    assert int(got["bn1"]["num_batches_tracked"]) == 3
    assert np.all(np.isfinite(np.asarray(got["bn2"]["running_var"])))


@pytest.mark.parametrize("tool", [precise_bn, update_bn], ids=["precise_bn", "update_bn"])
def test_functional_raises_by_default_and_when_every_batch_is_bad(tool):
    with pytest.raises(ValueError, match=r"batch 2 gave BatchNorm moments that are not finite"):
        _functional(tool, _batches(bad_at=2))
    with pytest.raises(ValueError, match="every batch .1. gave non-finite"):
        _functional(tool, _batches(bad_at=0, n=1), skip_nonfinite=True)


def test_first_batch_bad_still_checks_the_momentum_on_the_first_good_one():
    """update_bn's momentum check runs on the first batch it uses, not on a bad one."""
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
        got = _functional(update_bn, _batches(bad_at=0), skip_nonfinite=True)
    _assert_identical(got, _functional(update_bn, _without(_batches(), 0)))
    params, stats = _params()
    fixed = functools.partial(_stats_only, bn=functools.partial(bnjax.apply, momentum=0.1))
    with pytest.raises(ValueError, match="does not use momentum=None"):
        update_bn(fixed, params, stats, _batches(bad_at=0), progress=False, skip_nonfinite=True)


def test_nan_in_masked_padding_is_not_a_bad_batch():
    """Padding may hold NaN (SPEC): the moments of the counted values are finite."""
    x = np.asarray(_batches()[0])
    padded = np.concatenate([x, np.full((2, 3), np.nan, np.float32)])
    mask = np.arange(len(padded)) < len(x)

    def fn(params, stats, batch, bn):
        xb, m = batch
        y, new = bn(params["bn1"], stats["bn1"], xb, True, mask=m)
        return y, {"bn1": new}

    params, stats = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no batch skipped
        got = precise_bn(fn, params, {"bn1": stats["bn1"]}, [(padded, mask)], progress=False)
    x64 = x.astype(np.float64)  # the counted rows alone, in float64
    np.testing.assert_allclose(got["bn1"]["running_mean"], x64.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["bn1"]["running_var"], x64.var(0, ddof=1), rtol=1e-6)


def test_linen_and_nnx_skip_a_bad_batch():
    nn = pytest.importorskip("flax.linen")
    from flax import nnx

    import bnjax.linen
    import bnjax.nnx

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = bnjax.linen.BatchNorm()(x, train=train)
            return bnjax.linen.BatchNorm()(nn.relu(nn.Dense(4)(x)), train=train)

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((2, 3)), train=False)
    for tool in (precise_bn, update_bn):
        with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
            got = tool(net, variables, _batches(bad_at=3), progress=False, skip_nonfinite=True)
        expected = tool(net, variables, _without(_batches(), 3), progress=False)
        _assert_identical(got, expected)
        with pytest.raises(ValueError, match="batch 3 gave .* at BatchNorm_0"):
            tool(net, variables, _batches(bad_at=3), progress=False)

    class NNet(nnx.Module):
        def __init__(self, rngs):
            self.bn1 = bnjax.nnx.BatchNorm(3)
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.bn2 = bnjax.nnx.BatchNorm(4)

        def __call__(self, x):
            return self.bn2(nnx.relu(self.dense(self.bn1(x))))

    a, b = NNet(nnx.Rngs(0)), NNet(nnx.Rngs(0))
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
        precise_bn(a, _batches(bad_at=0), progress=False, skip_nonfinite=True)
    precise_bn(b, _without(_batches(), 0), progress=False)
    _assert_identical(nnx.state(a, nnx.BatchStat), nnx.state(b, nnx.BatchStat))
    assert int(a.bn1.num_batches_tracked[...]) == 3
