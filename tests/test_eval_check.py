"""The eval-trap check: eval outputs must not depend on batch composition or size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.deploy import EvalTrapError, check_batch_independence


def _cnn_init():
    rng = np.random.default_rng(0)
    p1, s1 = bnjax.init(4)
    p2, s2 = bnjax.init(3)
    # Running statistics that are not the batch's, as after training.
    s1 = dict(s1, running_mean=jnp.full(4, 0.3), running_var=jnp.full(4, 2.0))
    params = {
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
        "bn1": p1,
        "dense": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "bn2": p2,
    }
    return params, {"bn1": s1, "bn2": s2}


def _cnn(variables, x, *, train_bn1, train_bn2):
    """Returns the outputs of both BatchNorms, so the check can name the layer."""
    params, stats = variables
    h = jax.lax.conv_general_dilated(
        x,
        params["conv"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    h1, _ = bnjax.apply(params["bn1"], stats["bn1"], h, train_bn1)
    h = jnp.dot(jax.nn.relu(h1).mean(axis=(1, 2)), params["dense"], precision="highest")
    h2, _ = bnjax.apply(params["bn2"], stats["bn2"], h, train_bn2)
    return {"bn1_out": h1, "logits": h2}


@pytest.fixture(scope="module")
def setup():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5, 5, 2)), jnp.float32)
    return _cnn_init(), x


def test_passes_in_eval_mode(setup):
    variables, x = setup
    report = check_batch_independence(
        lambda v, b: _cnn(v, b, train_bn1=False, train_bn2=False), variables, x
    )
    assert report.ok and report.failures == ()
    assert report.max_abs_diff < 1e-5


def test_fires_in_train_mode_and_names_the_layer(setup):
    variables, x = setup

    def forgot_train_false(v, b):
        return _cnn(v, b, train_bn1=True, train_bn2=False)

    with pytest.raises(EvalTrapError, match=r"train=False") as info:
        check_batch_independence(forgot_train_false, variables, x)
    message = str(info.value)
    # Reversing keeps the batch's statistics, so it is the one regrouping that passes.
    assert "reversed:" not in message
    for regrouping in ("singles", "split", "recomposed", "enlarged"):
        assert f"{regrouping}: output ['bn1_out']" in message
    report = check_batch_independence(forgot_train_false, variables, x, raise_on_failure=False)
    assert not report.ok and report.max_abs_diff > 1e-2
    # bn1 is the layer that differs first; the logits inherit it.
    assert any("['bn1_out']" in f for f in report.failures)
    assert any("['logits']" in f for f in report.failures)


def test_a_dense_batchnorm_in_train_mode_fails_on_single_examples(setup):
    variables, x = setup
    report = check_batch_independence(
        lambda v, b: _cnn(v, b, train_bn1=False, train_bn2=True)["logits"],
        variables, x, raise_on_failure=False,
    )  # fmt: skip
    # One value per channel: bnjax.apply refuses a single example in training mode.
    assert report.failures[0].startswith("singles: apply_fn raised ValueError")
    assert any(f.startswith("reversed: output <root>") for f in report.failures) is False
    assert any(f.startswith("split: output <root>") for f in report.failures)


def test_bad_batches_are_rejected(setup):
    variables, x = setup

    def fn(v, b):
        return _cnn(v, b, train_bn1=False, train_bn2=False)

    with pytest.raises(ValueError, match="at least 2 examples"):
        check_batch_independence(fn, variables, x[:1])
    with pytest.raises(ValueError, match="same leading batch size"):
        check_batch_independence(lambda v, b: fn(v, b[0]), variables, (x, x[:3]))


# --- whole Flax models, run as they would be deployed.


def test_linen_and_nnx_models_are_checked_as_they_are():
    import flax.linen as nn
    from flax import nnx

    import bnjax.linen
    import bnjax.nnx

    class Net(nn.Module):
        track_running_stats: bool = True

        @nn.compact
        def __call__(self, x, train):
            h = nn.Dense(4)(x)
            return bnjax.linen.BatchNorm(track_running_stats=self.track_running_stats)(h, train)

    x = jax.random.normal(jax.random.key(0), (6, 3))
    variables = Net().init(jax.random.key(1), x, train=False)
    assert check_batch_independence(Net(), variables, x).ok  # default call: train=False
    # Without running statistics, eval mode normalizes with the batch: the trap.
    no_stats = Net(track_running_stats=False)
    report = check_batch_independence(
        no_stats,
        no_stats.init(jax.random.key(1), x, train=False),
        x,
        train=False,
        raise_on_failure=False,
    )
    assert not report.ok and report.failures[0].startswith("singles")

    class NnxNet(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.bn = bnjax.nnx.BatchNorm(4)

        def __call__(self, x):
            return self.bn(self.dense(x))

    model = NnxNet()  # training mode, as built: a forgotten model.eval()
    before = jax.tree.map(np.array, nnx.state(model))
    with pytest.raises(EvalTrapError, match="singles"):
        check_batch_independence(model, x)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # not changed
    model.eval()
    assert check_batch_independence(model, x).ok
    with pytest.raises(ValueError, match=r"checked as check_batch_independence\(model, batch\)"):
        check_batch_independence(model, variables, x)


# --- the tolerance follows the model's float32 rounding (issue 23, problem 12).


def _blocked_model():
    """A correct eval-mode model whose float32 rounding depends on the batch size.

    Its dense layer sums its 512 inputs in blocks whose count depends on the batch
    size, as GEMM and convolution kernels pick their blocking and algorithm from the
    problem size (exact per example, float32 rounding per batch size). Features with
    a large mean (about 520) and a small spread (2.4) then meet an eval-mode BatchNorm
    whose running statistics are the population's: it subtracts the mean and divides
    by the spread, amplifying the rounding to ~3e-5 on outputs of size ~2.
    """
    rng = np.random.default_rng(0)
    k, c = 512, 8
    w = jnp.asarray(rng.normal(size=(k, c)) / np.sqrt(k) + 0.1, jnp.float32)
    population = (rng.normal(size=(4096, k)) + 10.0) @ np.asarray(w, np.float64)
    params, stats = bnjax.init(c)
    stats = dict(
        stats,
        running_mean=jnp.asarray(population.mean(0), jnp.float32),
        running_var=jnp.asarray(population.var(0), jnp.float32),
    )
    x = jnp.asarray(rng.normal(size=(4, k)) + 10.0, jnp.float32)

    def apply_fn(variables, batch, train=False):
        w, params, stats = variables
        blocks = 1 if batch.shape[0] == 1 else 8 if batch.shape[0] < 8 else 64
        parts = jnp.einsum(
            "nbk,bkc->nbc",
            batch.reshape(batch.shape[0], blocks, -1),
            w.reshape(blocks, -1, w.shape[1]),
            precision="highest",
        )
        h = parts[:, 0]
        for i in range(1, blocks):
            h = h + parts[:, i]
        return bnjax.apply(params, stats, h, train)[0]

    return apply_fn, (w, params, stats), x


def test_tolerance_follows_the_models_float32_rounding():
    """Problem 12: a fixed 1e-5 flagged a correct eval-mode model (float32 rounding)."""
    apply_fn, variables, x = _blocked_model()
    # NumPy float64 reference: the model's own float32 error on this batch.
    w, params, stats = (jax.tree.map(lambda a: np.asarray(a, np.float64), v) for v in variables)
    h = np.asarray(x, np.float64) @ w
    exact = (h - stats["running_mean"]) / np.sqrt(stats["running_var"] + 1e-5)
    exact = exact * params["weight"] + params["bias"]
    own_error = np.abs(np.asarray(apply_fn(variables, x), np.float64) - exact).max()
    assert own_error > 1e-5  # the premise: float32 rounding above the old fixed 1e-5
    report = check_batch_independence(apply_fn, variables, x)
    assert report.ok and 1e-5 < report.max_abs_diff < 4 * own_error
    assert report.rule.startswith("8 x float32 rounding measured in float64")
    assert own_error < report.tolerances["<root>"] < 20 * own_error
    # The old fixed tolerance, still available, flags it.
    fixed = check_batch_independence(
        apply_fn, variables, x, rtol=1e-5, atol=1e-5, raise_on_failure=False
    )
    assert not fixed.ok and fixed.rule == "fixed rtol=1e-05, atol=1e-05"


def test_a_batchnorm_left_in_train_mode_still_fails_with_the_rounding_tolerance():
    apply_fn, variables, x = _blocked_model()
    with pytest.raises(EvalTrapError, match=r"singles: apply_fn raised ValueError") as e:
        check_batch_independence(lambda v, b: apply_fn(v, b, train=True), variables, x)
    assert "recomposed: output <root> differs by up to" in str(e.value)
    assert "(allowed " in str(e.value)


def test_without_a_float64_run_the_tolerance_is_an_estimate():
    """A model that keeps float32 whatever its inputs: FALLBACK_ULPS of its scale."""
    from bnjax._deploy.eval_check import FALLBACK_ULPS

    variables, x = _cnn_init(), jnp.asarray(np.random.default_rng(1).normal(size=(6, 5, 5, 2)))

    def float32_only(v, b):
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v)
        return _cnn(v, b.astype(jnp.float32), train_bn1=False, train_bn2=False)["logits"]

    report = check_batch_independence(float32_only, variables, x.astype(jnp.float32))
    scale = float(jnp.abs(float32_only(variables, x)).max())
    assert report.ok and report.rule.endswith("(no float64 run)")
    assert report.tolerances["<root>"] == pytest.approx(
        FALLBACK_ULPS * np.finfo(np.float32).eps * scale
    )
    with pytest.raises(EvalTrapError):
        check_batch_independence(
            lambda v, b: _cnn(v, b, train_bn1=True, train_bn2=False)["logits"],
            variables,
            x.astype(jnp.float32),
        )
