"""`bnjax.testing.check_model` judged against PyTorch's own rounding (issue 23, 7 and 11).

The fixture `tests/fixtures/testing_mbnet.npz` (`scripts/export_testing_fixtures.py`)
holds a MobileNet-style classifier (depthwise and bias-free convs, squeeze-excitation,
DropPath, dropout) run by PyTorch in float32 and, from the same weights, in float64,
with 3 SGD steps over 3 different batches. PyTorch's own float32 gradients are 2.5e-5
from its float64 ones there: a fixed tolerance of 1e-5 fails a correct port, which is
problem 7. The port (`testing_ports.py`) is built in float32 and in float64.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testing_ports as P

from bnjax import interop, testing

FIXTURES = Path(__file__).parent / "fixtures"
SGD = optax.sgd(0.1, momentum=0.9)  # the fixture's torch.optim.SGD(lr=0.1, momentum=0.9)
GROUPS = ["eval", "train", "state", "grads", "steps"]


def nchw_to_nhwc(x):
    return x.transpose(0, 2, 3, 1)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def fixture() -> testing.Fixture:
    return testing.load_fixture(FIXTURES / "testing_mbnet.npz")


def port(dtype=jnp.float32, **bn):
    """The Flax model and its variables holding the fixture's initial state, in `dtype`."""
    model = P.MBNet(dtype=dtype, bn=bn)
    x = nchw_to_nhwc(fixture().inputs()[0]).astype(dtype)
    variables = interop.from_torch(
        fixture().state_dict(), interop.flax_template(model, x, train=False)
    )
    cast = lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return model, jax.tree.map(cast, variables)


def check(model, variables, fx=None, **kwargs):
    return testing.check_model(
        fx or fixture(), model, variables, loss=cross_entropy, inputs=nchw_to_nhwc,
        optimizer=SGD, **kwargs,
    )  # fmt: skip


# --------------------------------------------------------------------------- problem 7


def test_defaults_pass_a_correct_float32_port_at_pytorchs_own_rounding():
    """Problem 7: the default judged a correct float32 port wrong (1e-5 < PyTorch's own)."""
    g32, g64 = fixture().grads(), fixture().float64().grads()
    torch_own = max(np.abs(g32[k] - g64[k]).max() for k in g64)
    assert torch_own > 2e-5  # the fixture's premise: PyTorch float32 is this far from float64
    result = check(*port())
    assert result.ok and result.reference == "float64"
    assert [g.name for g in result.groups] == GROUPS
    grads = result.group("grads")
    assert grads.torch_error == pytest.approx(torch_own)
    assert grads.rule == f"rounding x{testing.ROUNDING_FACTOR:g}"
    assert 0 < grads.error < grads.torch_error * testing.ROUNDING_FACTOR
    # The table: one line per group with its numbers.
    table = str(result).splitlines()
    assert table[0].split()[:3] == ["group", "leaves", "max"] and len(table) == 1 + len(GROUPS)


def test_a_fixed_1e5_tolerance_still_available_and_fails_this_correct_port():
    result = check(*port(), tolerances={"grads": (1e-5, 1e-5)}, raise_on_failure=False)
    grads = result.group("grads")
    assert grads.rule == "fixed rtol=1e-05, atol=1e-05" and not grads.ok
    assert [g.name for g in result.failures] == ["grads"]


def test_every_group_is_checked_and_all_failures_are_listed_at_the_end():
    """A wrong port (one BatchNorm's running variance 1% off) fails eval, state and steps."""
    model, variables = port()
    variables["batch_stats"]["head_bn"]["running_var"] *= 1.01
    result = check(model, variables, raise_on_failure=False)
    assert [g.name for g in result.groups] == GROUPS  # nothing skipped after a failure
    assert [g.name for g in result.failures] == ["eval", "state", "steps"]
    assert result.group("train").ok and result.group("grads").ok  # train mode: batch stats
    with pytest.raises(AssertionError) as e:
        result.raise_on_failure()
    msg = str(e.value)
    assert msg.startswith("bnjax.testing.check_model: 3 of 5 groups out of tolerance")
    assert "(eval, state, steps)" in msg and "state/head_bn.running_var" in msg
    with pytest.raises(AssertionError, match="3 of 5 groups"):
        check(model, variables)  # raise_on_failure=True: the same, raised


@pytest.mark.parametrize(
    "wrong",
    [{"epsilon": 1e-3}, {"momentum": 0.01}],
    ids=["keras_eps", "flax_momentum"],
)
def test_subtle_wrong_ports_fail_the_defaults(wrong):
    """A BatchNorm eps of 1e-3 (Keras's) or momentum 0.01 instead of torch's 1e-5 and 0.1."""
    result = check(*port(**wrong), raise_on_failure=False)
    assert not result.ok
    failing = {g.name for g in result.failures}
    assert ("eval" in failing) if "epsilon" in wrong else (failing == {"state", "steps"})


# --------------------------------------------------------------------------- float64


def test_float64_port_is_held_to_float64_rounding():
    with jax.enable_x64(True):
        model, variables = port(jnp.float64)
        result = check(model, variables)
        assert result.ok
        for g in result.groups:
            assert g.error < 1e-11 and g.allowed < 1e-10, g

        # Running statistics kept in float32 (problem 4's symptom): a float64 check at
        # 1e-5 would pass; the defaults do not.
        def narrowing(v, x, train):
            if not train:
                return model.apply(v, x, train=False), v
            y, new = model.apply(v, x, train=True, mutable=["batch_stats"])
            narrow = lambda a: a.astype(jnp.float32).astype(a.dtype)  # noqa: E731
            return y, {**v, "batch_stats": jax.tree.map(narrow, new["batch_stats"])}

        bad = check(narrowing, variables, raise_on_failure=False)
    assert bad.group("eval").ok and not bad.group("state").ok
    assert bad.group("state").error < 1e-5


# --------------------------------------------------------------------------- problem 11


def test_steps_are_replayed_each_on_its_recorded_batch():
    """Problem 11: 3 SGD steps over 3 batches; a replay on the first batch fails."""
    fx = fixture()
    assert fx.steps == 3 and fx.meta["step_batches"] == 2
    assert not np.array_equal(fx.inputs(1)[0], fx.inputs(0)[0])
    assert not np.array_equal(fx.targets(2)[0], fx.targets(0)[0])
    result = check(*port())
    paths = {leaf.path for leaf in result.leaves if leaf.path.startswith("steps/")}
    assert {"steps/1/loss", "steps/2/loss", "steps/2/fc.weight", "steps/0/bn.running_var"} <= paths
    assert result.group("steps").ok
    # The same fixture without its step batches replays every step on the first batch
    # (what check_model did before): the losses of steps 1 and 2 no longer match.
    one_batch = {k: v for k, v in fx.arrays.items() if "/inputs/" not in k and "/targets/" not in k}
    replay = check(*port(), fx=testing.Fixture(fx.meta, one_batch), raise_on_failure=False)
    bad = {leaf.path for leaf in replay.leaves if not leaf.ok}
    assert {"steps/1/loss", "steps/2/loss"} <= bad


# --------------------------------------------------------------------------- old fixtures


def test_a_fixture_without_float64_reference_uses_fixed_tolerances():
    """Fixtures written before the float64 reference still check, and say how."""
    import torch_ports as TP

    fx = testing.load_fixture(FIXTURES / "port_mlp.npz")
    assert fx.float64() is None
    model = TP.MLP()
    variables = interop.from_torch(
        fx.state_dict(), interop.flax_template(model, fx.inputs()[0], train=False)
    )
    labels = fx.extra("labels")
    result = testing.check_model(
        fx, model, variables, loss=lambda y: cross_entropy(y, labels), optimizer=SGD
    )
    assert result.ok and result.reference == "float32"
    assert {g.rule for g in result.groups} == {"fixed rtol=1e-05, atol=1e-05"}
    assert {g.torch_error for g in result.groups} == {None}


def test_unknown_tolerance_group_is_an_error():
    with pytest.raises(ValueError, match=r"unknown tolerance groups \['logits'\]"):
        check(*port(), tolerances={"logits": (1e-3, 1e-3)})


# --------------------------------------------------------------------------- the rule


def test_compare_rounding_rule():
    """factor x PyTorch's own error, the group's relative error, its median, eps ratio."""
    ref = {"a": np.array([1.0, 2.0]), "b": np.array([0.0, 1e-17]), "n": np.array(3)}
    t32 = {"a": np.array([1.0, 2.0 + 4e-7]), "b": np.array([0.0, 0.0]), "n": np.array(3)}
    eps32, eps64 = np.finfo(np.float32).eps, np.finfo(np.float64).eps
    # b: PyTorch exact by luck; it still gets the group's median rounding, 4e-7.
    got = {"a": np.array([1.0, 2.0 - 2e-6], np.float32), "b": np.array([3e-6, 0.0], np.float32),
           "n": np.array(3)}  # fmt: skip
    rows = {r.path: r for r in testing.compare_rounding(got, ref, t32, factor=10)}
    assert rows["a"].allowed == pytest.approx(10 * 4e-7 + 8 * eps32 * 2.0)
    assert rows["b"].allowed == pytest.approx(10 * 4e-7 + 8 * eps32 * 1e-17)
    assert rows["a"].torch_error == pytest.approx(4e-7) and rows["b"].torch_error == 1e-17
    assert rows["a"].ok and rows["b"].ok and rows["n"].ok
    got["a"][1] = 2.0 - 1e-5  # 25x PyTorch's own error: out at factor 10
    assert not testing.compare_rounding(got, ref, t32, factor=10)[0].ok
    # float64: the same rounding scaled by eps64 / eps32.
    got64 = {"a": np.array([1.0, 2.0]), "b": np.zeros(2), "n": np.array(4)}
    rows = {r.path: r for r in testing.compare_rounding(got64, ref, t32, factor=10)}
    assert rows["a"].allowed == pytest.approx(10 * 4e-7 * eps64 / eps32 + 8 * eps64 * 2.0)
    assert not rows["n"].ok  # integers are exact


def test_the_model_runs_at_full_float32_precision():
    """No TF32 or bfloat16 passes on accelerators: those are far above PyTorch's rounding."""
    y = np.array([[3.0]], np.float32)
    arrays = {"inputs/0": np.ones((1, 2), np.float32), "eval/output/0": y, "train/output/0": y}
    arrays["state_dict/train/fc.weight"] = np.array([[1.0, 2.0]], np.float32)
    fx = testing.Fixture({}, arrays)
    variables = {"params": {"fc": {"kernel": jnp.array([[1.0], [2.0]])}}}
    seen = []

    def forward(v, x, train):
        seen.append(jax.config.jax_default_matmul_precision)  # read while tracing
        return x @ v["params"]["fc"]["kernel"], v

    assert testing.check_model(fx, forward, variables).reference == "float32"
    assert set(seen) == {"highest"}
    seen.clear()
    testing.check_model(fx, forward, variables, precision=None)
    assert set(seen) == {None}
