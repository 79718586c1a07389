"""`bnjax.testing`: comparing trees with a report, loading and exporting fixtures."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import testing


def test_report_names_the_worst_element_of_every_leaf():
    expected = {"a": np.zeros((2, 3)), "b": np.ones(4)}
    actual = {"a": np.zeros((2, 3)), "b": np.ones(4)}
    actual["a"][1, 2] = 1e-3  # fails
    actual["b"][3] = 1.0 + 5e-6  # passes (atol + rtol * 1 = 2e-5)
    with pytest.raises(AssertionError) as e:
        testing.assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5, name="out")
    msg = str(e.value)
    assert "1 of 2 leaves out of tolerance" in msg and "['out/a']" in msg
    assert "(1, 2): got 0.001, expected 0  <-- FAIL" in msg
    assert "out/b" in msg and "(3,): got 1.000005, expected 1" in msg


def test_passing_report_and_its_numbers():
    report = testing.assert_trees_close(
        {"y": jnp.array([1.0, 2.0])}, {"y": np.array([1.0, 2.00001])}, rtol=1e-5, atol=0
    )
    assert report.ok and len(report.leaves) == 1
    leaf = report.leaves[0]
    assert leaf.path == "y" and leaf.index == (1,)
    assert leaf.max_abs_diff == pytest.approx(1e-5, rel=1e-3)
    assert leaf.tol_used == pytest.approx(1e-5 / 2.00001e-5, rel=1e-3)
    assert "y" in str(report)


def test_integers_exact_nans_equal_structure_and_shapes_checked():
    testing.assert_trees_close({"n": np.int32(3)}, {"n": np.int64(3)})
    with pytest.raises(AssertionError, match="FAIL"):
        testing.assert_trees_close({"n": np.int32(3)}, {"n": np.int64(4)}, atol=10)
    testing.assert_trees_close({"x": np.array([np.nan, 1.0])}, {"x": np.array([np.nan, 1.0])})
    with pytest.raises(AssertionError, match="FAIL"):
        testing.assert_trees_close({"x": np.array([np.nan])}, {"x": np.array([1.0])})
    with pytest.raises(AssertionError, match=r"missing: \['b'\], unexpected: \['c'\]"):
        testing.assert_trees_close({"a": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0})
    with pytest.raises(AssertionError, match=r"'a' has shape \(2,\), expected \(3,\)"):
        testing.assert_trees_close({"a": np.ones(2)}, {"a": np.ones(3)})


def test_load_fixture(tmp_path):
    meta = {"order": ["inputs/0", "state_dict/init/fc.weight"], "steps": 0}
    np.savez(
        tmp_path / "f.npz",
        __meta__=np.asarray(json.dumps(meta)),
        **{"state_dict/init/fc.weight": np.ones((2, 3)), "inputs/0": np.zeros(3)},
    )
    fixture = testing.load_fixture(tmp_path / "f.npz")
    assert list(fixture.arrays) == meta["order"]
    assert list(fixture.state_dict()) == ["fc.weight"]
    assert len(fixture.inputs()) == 1
    with pytest.raises(KeyError, match="no 'grads/...' arrays"):
        fixture.grads()
    np.savez(tmp_path / "g.npz", x=np.ones(2))
    with pytest.raises(ValueError, match="no '__meta__'"):
        testing.load_fixture(tmp_path / "g.npz")


@pytest.mark.torch
def test_export_fixture_records_what_a_port_needs(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3)
    fixture = testing.export_fixture(
        tmp_path / "f.npz",
        net,
        (x,),
        loss=lambda y: y.square().mean(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        steps=2,
        description="tiny",
        command="pytest tests/test_testing.py",
    )
    for k, v in net.state_dict().items():  # the caller's module is not trained
        assert torch.equal(v, before[k]), k
    meta = fixture.meta
    assert meta["command"] == "pytest tests/test_testing.py" and meta["description"] == "tiny"
    assert meta["torch_version"] == torch.__version__ and meta["steps"] == 2
    assert meta["optimizer"] == "SGD" and meta["optimizer_defaults"]["lr"] == 0.1
    np.testing.assert_array_equal(fixture.inputs()[0], x.numpy())
    init = fixture.state_dict()
    assert list(init) == list(net.state_dict())
    trained = fixture.state_dict("train")
    assert int(trained["1.num_batches_tracked"]) == 1 and int(init["1.num_batches_tracked"]) == 0
    np.testing.assert_array_equal(trained["0.weight"], init["0.weight"])  # only a forward
    assert sorted(fixture.grads()) == sorted(k for k, _ in net.named_parameters())
    assert int(fixture.state_dict("step1")["1.num_batches_tracked"]) == 2
    # Dropout is off in the training pass by default: eval == train up to BatchNorm.
    net.eval()
    with torch.no_grad():
        np.testing.assert_allclose(fixture.outputs("eval")[0], net(x).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="need a `loss`"):
        testing.export_fixture(tmp_path / "h.npz", net, (x,), optimizer=lambda p: None, steps=1)
    with pytest.raises(ValueError, match="both `optimizer` and `steps`"):
        testing.export_fixture(tmp_path / "h.npz", net, (x,), loss=lambda y: y.sum(), steps=1)
