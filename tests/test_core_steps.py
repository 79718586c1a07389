"""The core's two public steps, the layer factory, and weight-only BatchNorm.

Expected values come from the float64 reference (`reference.py`) or from the
definition `apply == update_stats . normalize` (bit for bit).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import ref_batchnorm

import bnjax

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(6, 5, 3)) * 2 + 1, jnp.float32)


def _state(c=3, nbt=2):
    return {
        "running_mean": jnp.asarray(RNG.normal(size=c), jnp.float32),
        "running_var": jnp.asarray(RNG.uniform(0.5, 2, size=c), jnp.float32),
        "num_batches_tracked": jnp.asarray(nbt, jnp.int32),
    }


# --------------------------------------------------------------------------- weight only


@pytest.mark.parametrize("train", [True, False])
def test_weight_only_params_match_the_float64_reference(train):
    """PyTorch 2.13's BatchNorm2d(C, bias=False): params {"weight"} alone."""
    weight = jnp.asarray(RNG.uniform(0.5, 1.5, 3), jnp.float32)
    stats = _state()
    y, new = jax.jit(bnjax.apply, static_argnames=("train", "momentum"))(
        {"weight": weight}, stats, X, train=train, momentum=0.3
    )
    np_stats = jax.tree.map(np.asarray, stats)
    y_ref, new_ref = ref_batchnorm(X, weight, None, np_stats, train=train, momentum=0.3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(new[key], new_ref[key], rtol=1e-6, atol=1e-7)
    assert int(new["num_batches_tracked"]) == int(new_ref["num_batches_tracked"])


def test_init_bias_false_gives_weight_only_and_grads():
    params, _ = bnjax.init(3, bias=False)
    assert set(params) == {"weight"}
    grads = jax.grad(lambda p: jnp.sum(bnjax.apply(p, {}, X, True)[0] ** 3))(params)
    assert set(grads) == {"weight"} and np.all(np.isfinite(grads["weight"]))


def test_bias_only_params_are_refused_and_left_untouched():
    params = {"bias": jnp.zeros(3)}
    before = jax.tree.map(np.array, params)
    with pytest.raises(ValueError, match=r"'bias' but no 'weight'.*bias=False"):
        bnjax.apply(params, {}, X, True)
    chex.assert_trees_all_equal(params, before)


def test_init_rejects_forward_settings_with_a_pointer_to_apply():
    with pytest.raises(TypeError, match=r"\['eps'\].*bnjax\.apply.*bnjax\.batch_norm"):
        bnjax.init(16, eps=1e-3)
    with pytest.raises(TypeError, match=r"momentum.*bnjax\.apply"):
        bnjax.init(16, momentum=0.1)


# --------------------------------------------------------------------------- two steps


@pytest.mark.parametrize(
    "case", ["train", "eval", "untracked_train", "untracked_eval", "mask", "none_momentum"]
)
def test_apply_is_update_stats_after_normalize_bit_for_bit(case):
    params, stats = {"weight": jnp.full(3, 1.5), "bias": jnp.full(3, -0.5)}, _state()
    kw, train, momentum = {}, True, 0.1
    if case == "eval":
        train = False
    elif case.startswith("untracked"):
        stats, train = {}, case.endswith("train")
    elif case == "mask":
        kw["mask"] = jnp.arange(6)[:, None] < jnp.array([[4]])
    elif case == "none_momentum":
        momentum = None

    @jax.jit
    def both(params, stats, x):
        y1, s1 = bnjax.apply(params, stats, x, train, momentum=momentum, **kw)
        y2, moments = bnjax.normalize(params, stats, x, train, **kw)
        s2 = bnjax.update_stats(stats, moments, momentum=momentum)
        return (y1, s1), (y2, s2), moments

    one, two, moments = both(params, stats, X)
    chex.assert_trees_all_equal(one, two)
    used_batch = train or not stats
    assert (moments is None) == (not used_batch)


def test_normalize_moments_are_the_batch_moments():
    _, moments = bnjax.normalize({}, {}, X, True)
    flat = np.asarray(X, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(moments.mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(moments.var, flat.var(0), rtol=1e-5)
    assert moments.count == 30


def test_update_stats_keeps_statistics_below_two_values():
    stats = _state()
    for n in (0, 1):
        m = bnjax.Moments(jnp.ones(3), jnp.ones(3), jnp.asarray(n, jnp.int32))
        new = bnjax.update_stats(stats, m, momentum=0.5)
        np.testing.assert_array_equal(new["running_mean"], stats["running_mean"])
        assert int(new["num_batches_tracked"]) == 3
    with pytest.raises(ValueError, match="momentum"):
        bnjax.update_stats(stats, m, momentum=2.0)


# --------------------------------------------------------------------------- the factory


def test_batch_norm_factory_closes_over_its_settings():
    bn = bnjax.batch_norm(momentum=0.3, eps=1e-3, axis=1, bias=False)
    params, stats = bn.init(5)
    assert set(params) == {"weight"}
    y, new = jax.jit(bn.apply, static_argnames="train")(params, stats, X, train=True)
    y_ref, new_ref = ref_batchnorm(
        X,
        params["weight"],
        None,
        jax.tree.map(np.asarray, stats),
        train=True,
        momentum=0.3,
        eps=1e-3,
        axes=(1,),
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["running_var"], new_ref["running_var"], rtol=1e-6)
    assert bn.config == bnjax.BatchNormConfig(momentum=0.3, eps=1e-3, axis=1, bias=False)
    assert hash(bn.config) == hash(
        bnjax.BatchNormConfig(momentum=0.3, eps=1e-3, axis=(1,)[0], bias=False)
    )
    with pytest.raises(ValueError, match="eps"):
        bnjax.batch_norm(eps=0.0)


def test_report_carries_moments_as_leaves_and_config_as_static_data():
    bn = bnjax.batch_norm(momentum=0.2, eps=1e-3)
    params, stats = bn.init(3)

    @jax.jit
    def f(params, stats, x):
        y, moments = bn.normalize(params, stats, x, True)
        return bn.report(moments)

    report = f(params, stats, X)
    assert isinstance(report, bnjax.BatchNormReport) and report.config == bn.config
    assert len(jax.tree.leaves(report)) == 3 and report.count.dtype == jnp.int32
    assert int(report.count) == 30 and report.trained
    eval_report = bn.report(None)
    assert jax.tree.leaves(eval_report) == [] and not eval_report.trained


# --------------------------------------------------------------------------- no hidden state


def test_no_module_level_mutable_state_and_the_core_knows_no_tools():
    """No ContextVar, no global hooks (the layering itself: tests/test_architecture.py)."""
    import ast
    from pathlib import Path

    root = Path(bnjax.__file__).parent
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        assert "contextvars" not in source and "ContextVar" not in source, path.name
        for node in ast.parse(source).body:  # module-level statements
            assert not isinstance(node, ast.Global), path.name
            names = [
                t.id
                for t in getattr(node, "targets", [getattr(node, "target", None)])
                if isinstance(t, ast.Name)
            ]
            if names == ["__all__"]:
                continue
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(
                node.value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp)
            ):
                raise AssertionError(f"{path.name}:{node.lineno}: a module-level mutable container")
