"""Fixtures that replay real training (issue 23, problems 8, 9 and 10).

`export_fixture` makes stochastic layers deterministic (or refuses them), records
several steps over different batches and a float64 reference; `load_fixture` reads
lazily and says clearly when a file is not a fixture. Expected values come from torch
itself (a hand-written training loop, the model with its drop rates set to 0).
"""

from __future__ import annotations

import copy
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from bnjax import testing

FIXTURES = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------- problem 9


def test_identical_trees_pass_with_zero_tolerances():
    """Problem 9: rtol=atol=0 failed identical leaves (0/0 -> 'tol used inf')."""
    tree = {"w": np.array([[0.0, -1.5], [2.0, 3e-30]]), "n": np.int64(7), "nan": np.array([np.nan])}
    report = testing.assert_trees_close(tree, copy.deepcopy(tree), rtol=0, atol=0)
    assert report.ok and all(leaf.tol_used == 0.0 for leaf in report.leaves)
    one_ulp = {**tree, "w": np.nextafter(tree["w"], np.inf)}
    with pytest.raises(AssertionError, match="FAIL"):
        testing.assert_trees_close(one_ulp, tree, rtol=0, atol=0)


# --------------------------------------------------------------------------- problem 10


def _write(path, meta, arrays):
    np.savez(path, **({"__meta__": np.asarray(meta)} if meta is not None else {}), **arrays)
    return path


def test_files_of_another_format_get_a_clear_error(tmp_path):
    """Problem 10: a JSONDecodeError ('Expecting value') for an npz it did not write."""
    not_json = _write(tmp_path / "a.npz", "made by torch 2.13", {"inputs/0": np.ones(2)})
    with pytest.raises(ValueError, match=r"'__meta__' is not the JSON object export_fixture") as e:
        testing.load_fixture(not_json)
    assert "'made by torch 2.13'" in str(e.value) and "inputs/0" in str(e.value)
    # Another of the repository's formats: JSON metadata, other array names.
    with pytest.raises(ValueError, match=r"no 'inputs/<i>' arrays .*scripts/export_torch_fixtures"):
        testing.load_fixture(FIXTURES / "a_grid_bn2d.npz")
    no_meta = _write(tmp_path / "b.npz", None, {"x": np.ones(2)})
    with pytest.raises(ValueError, match=r"no '__meta__' entry.*\['x'\]"):
        testing.load_fixture(no_meta)
    np.save(tmp_path / "c.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"a single array of shape \(3,\)"):
        testing.load_fixture(tmp_path / "c.npy")
    (tmp_path / "d.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="is not an .npz archive"):
        testing.load_fixture(tmp_path / "d.npz")
    future = _write(tmp_path / "e.npz", json.dumps({"format": 99}), {"inputs/0": np.ones(2)})
    with pytest.raises(ValueError, match="format 99, newer than"):
        testing.load_fixture(future)


def test_load_fixture_reads_arrays_only_when_used(tmp_path):
    """Problem 10: everything was read at once (540 MB for a ResNet-18 run)."""
    big = np.random.default_rng(0).normal(size=(4_000_000,)).astype(np.float32)  # 16 MB
    meta = json.dumps({"order": ["inputs/0", "state_dict/init/w", "grads/w"], "steps": 0})
    path = _write(tmp_path / "f.npz", meta, {"inputs/0": np.arange(3.0), "state_dict/init/w": big,
                                             "grads/w": 2 * big})  # fmt: skip
    tracemalloc.start()
    try:
        fixture = testing.load_fixture(path)
        x = fixture.inputs()[0]
        loaded_peak = tracemalloc.get_traced_memory()[1]
        w = fixture.state_dict()["w"]
        used_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(fixture.arrays) == ["inputs/0", "state_dict/init/w", "grads/w"]
    np.testing.assert_array_equal(x, np.arange(3.0))
    np.testing.assert_array_equal(w, big)
    assert loaded_peak < 1_000_000 < big.nbytes <= used_peak < 3 * big.nbytes  # w, not grads


# --------------------------------------------------------------------------- problem 8


def _torch_nets():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class DropPath(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            return x * (torch.rand(x.shape[0], 1) >= self.p).to(x.dtype) / (1 - self.p)

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.bn = nn.BatchNorm1d(6)
            self.drop_path = DropPath(p)
            self.p = p

        def forward(self, x):
            h = F.dropout(self.bn(self.fc(x)), self.p, self.training)  # functional dropout
            return x + self.drop_path(h)

    class Net(nn.Module):
        def __init__(self, p=0.3):
            super().__init__()
            self.blocks = nn.Sequential(Block(p), Block(p))
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.blocks(x))

    class Noisy(nn.Module):  # randomness that ignores self.training
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x)

    return torch, Net, Noisy


def _export(tmp_path, name, net, x, **kwargs):
    torch = sys.modules["torch"]
    return testing.export_fixture(
        tmp_path / name, net, (x,), loss=lambda y, t: torch.nn.functional.cross_entropy(y, t),
        command="pytest tests/test_fixture_files.py", **kwargs,
    )  # fmt: skip


@pytest.mark.torch
def test_stochastic_layers_are_made_deterministic(tmp_path):
    """Problem 8: DropPath and F.dropout stayed on; two exports differed by 2.0."""
    torch, Net, _ = _torch_nets()
    torch.manual_seed(0)
    net = Net()
    x, t = torch.randn(8, 6) * 2 + 1, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    rng = torch.random.get_rng_state()
    a = _export(tmp_path, "a.npz", net, x, targets=(t,))
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's stream untouched
    torch.manual_seed(123)  # another random stream: the same fixture
    b = _export(tmp_path, "b.npz", net, x, targets=(t,))
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    assert a.meta["deterministic_modules"] == [
        "blocks.0.drop_path", "blocks.1.drop_path", "blocks.0", "blocks.1"
    ]  # fmt: skip
    # Reference: the same net with its drop rates set to 0, BatchNorms in training mode.
    plain = copy.deepcopy(net)
    for block in plain.blocks:
        block.p = block.drop_path.p = 0.0
    plain.train()
    y = plain(x)
    np.testing.assert_array_equal(a.outputs("train")[0], y.detach().numpy())
    sd = plain.state_dict()
    for key in ("blocks.0.bn.running_mean", "blocks.1.bn.running_var"):
        np.testing.assert_array_equal(a.state_dict("train")[key], sd[key].numpy())
    assert int(a.state_dict("train")["blocks.1.bn.num_batches_tracked"]) == 1


@pytest.mark.torch
def test_randomness_that_ignores_training_is_refused(tmp_path):
    torch, Net, Noisy = _torch_nets()
    x = torch.randn(8, 6)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), Noisy(), torch.nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"stays random with '1' \(Noisy\) in eval mode") as e:
        _export(tmp_path, "n.npz", net, x, targets=(torch.zeros(8, dtype=torch.long),))
    assert "follow `self.training`" in str(e.value)
    with pytest.raises(
        ValueError,
        match=r"random in 'blocks.0' \(Block\), 'blocks.0.drop_path' \(DropPath\), 'blocks.1' ",
    ):
        _export(tmp_path, "r.npz", Net(), x, targets=(torch.zeros(8, dtype=torch.long),),
                stochastic="raise")  # fmt: skip
    assert not (tmp_path / "n.npz").exists() and not (tmp_path / "r.npz").exists()


@pytest.mark.torch
def test_steps_over_batches_and_float64_reference_match_a_torch_loop(tmp_path):
    """Several steps over different batches, and the float64 run, as torch computes them."""
    torch, Net, _ = _torch_nets()
    torch.manual_seed(1)
    net = Net(p=0.0)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(3)]  # fmt: skip
    fx = _export(
        tmp_path, "s.npz", net, batches[0][0], targets=(batches[0][1],),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        batches=[((x,), (t,)) for x, t in batches[1:]],
    )  # fmt: skip
    assert fx.steps == 3 and fx.meta["step_batches"] == 2
    np.testing.assert_array_equal(fx.inputs(2)[0], batches[2][0].numpy())
    np.testing.assert_array_equal(fx.targets(1)[0], batches[1][1].numpy())
    for dtype, ref in ((torch.float32, fx), (torch.float64, fx.float64())):
        loop = copy.deepcopy(net).to(dtype).train()
        opt = torch.optim.SGD(loop.parameters(), lr=0.1, momentum=0.9)
        for k, (x, t) in enumerate(batches):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(loop(x.to(dtype)), t)
            loss.backward()
            opt.step()
            assert float(ref.loss(k)) == loss.item(), (dtype, k)
            for key, value in loop.state_dict().items():
                got = ref.state_dict(f"step{k}")[key]
                assert got.dtype == value.numpy().dtype, key
                np.testing.assert_array_equal(got, value.numpy(), err_msg=f"{dtype} {k} {key}")
    meta = fx.meta
    assert meta["command"] == "pytest tests/test_fixture_files.py" and meta["format"] == 2
    assert meta["torch_version"] == torch.__version__ and meta["float64_reference"] is True
    for key in ("numpy_version", "python_version", "platform", "bnjax_version"):
        assert meta[key], key
    with pytest.raises(ValueError, match=r"steps must be 3, got 2"):
        _export(tmp_path, "x.npz", net, batches[0][0], targets=(batches[0][1],), steps=2,
                optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                batches=[((x,), (t,)) for x, t in batches[1:]])  # fmt: skip


@pytest.mark.torch
def test_default_command_is_the_exact_command_line(tmp_path):
    torch = pytest.importorskip("torch")
    fx = testing.export_fixture(tmp_path / "c.npz", torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    assert fx.meta["command"].split()[1:] == sys.argv
    assert fx.float64().outputs("eval")[0].dtype == np.float64
