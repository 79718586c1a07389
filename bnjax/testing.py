"""Equivalence tests of a JAX model against PyTorch: export a fixture, check a model.

Two halves that meet in one `.npz` file:

- `export_fixture` (needs torch) runs any `torch.nn.Module` on given inputs and saves
  what a port must reproduce: the state_dict, the outputs in eval and train mode, the
  state after the training forward (running statistics), the gradients of a loss, and
  optionally k optimizer steps; its `__meta__` holds the versions and the command.
- `load_fixture`, `check_model` and `assert_trees_close` (no torch) replay it with a
  Flax model or any JAX function and compare with per-group tolerances; a failure
  names the worst element of every leaf (path, index, got, expected).

A whole-model test, the torch side once:

    bnjax.testing.export_fixture("net.npz", torch_net, (x,), loss=lambda y: y.square().mean())

and then, without torch:

    fixture = bnjax.testing.load_fixture("net.npz")
    variables = bnjax.interop.from_torch(fixture.state_dict(), model.init(key, x_nhwc))
    bnjax.testing.check_model(fixture, model, variables, loss=lambda y: (y**2).mean(),
                              inputs=lambda x: x.transpose(0, 2, 3, 1))
"""

from bnjax._testing.check import check_model as check_model
from bnjax._testing.compare import Comparison as Comparison
from bnjax._testing.compare import LeafComparison as LeafComparison
from bnjax._testing.compare import assert_trees_close as assert_trees_close
from bnjax._testing.fixture import Fixture as Fixture
from bnjax._testing.fixture import export_fixture as export_fixture
from bnjax._testing.fixture import load_fixture as load_fixture

__all__ = [
    "Comparison",
    "Fixture",
    "LeafComparison",
    "assert_trees_close",
    "check_model",
    "export_fixture",
    "load_fixture",
]
