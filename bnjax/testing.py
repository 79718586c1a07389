"""Equivalence tests of a JAX model against PyTorch: export a fixture, check a model.

Two halves that meet in one `.npz` file:

- `export_fixture` (needs torch) runs any `torch.nn.Module` on given inputs and saves
  what a port must reproduce: the state_dict, the outputs in eval and train mode, the
  state after the training forward (running statistics), the gradients of a loss, and
  optionally k optimizer steps over different batches; a float64 copy of the model
  records the same again (the float64 reference); stochastic layers are made
  deterministic; its `__meta__` holds the versions and the command.
- `load_fixture`, `check_model` and `assert_trees_close` (no torch) replay it with a
  Flax model or any JAX function. `check_model` judges each group (eval and train
  outputs, state, gradients, steps) against PyTorch's own float32 rounding measured
  from the float64 reference, checks every group and returns a `ModelCheck` table;
  a failure names the worst element of every leaf (path, index, got, expected).

A whole-model test, the torch side once:

    bnjax.testing.export_fixture("net.npz", torch_net, (x,), targets=(labels,),
                                 loss=lambda y, t: F.cross_entropy(y, t))

and then, without torch:

    fixture = bnjax.testing.load_fixture("net.npz")
    variables = bnjax.interop.from_torch(fixture.state_dict(), model.init(key, x_nhwc))
    bnjax.testing.check_model(fixture, model, variables, loss=cross_entropy,
                              inputs=lambda x: x.transpose(0, 2, 3, 1))
"""

from bnjax._testing.check import DEFAULT_TOLERANCES as DEFAULT_TOLERANCES
from bnjax._testing.check import check_model as check_model
from bnjax._testing.compare import ROUNDING_FACTOR as ROUNDING_FACTOR
from bnjax._testing.compare import Comparison as Comparison
from bnjax._testing.compare import GroupCheck as GroupCheck
from bnjax._testing.compare import LeafComparison as LeafComparison
from bnjax._testing.compare import ModelCheck as ModelCheck
from bnjax._testing.compare import assert_trees_close as assert_trees_close
from bnjax._testing.compare import compare_rounding as compare_rounding
from bnjax._testing.fixture import Fixture as Fixture
from bnjax._testing.fixture import export_fixture as export_fixture
from bnjax._testing.fixture import load_fixture as load_fixture
from bnjax._testing.locate import Divergence as Divergence
from bnjax._testing.locate import LayerDivergence as LayerDivergence
from bnjax._testing.locate import locate_divergence as locate_divergence

__all__ = [
    "DEFAULT_TOLERANCES",
    "ROUNDING_FACTOR",
    "Comparison",
    "Divergence",
    "Fixture",
    "GroupCheck",
    "LayerDivergence",
    "LeafComparison",
    "ModelCheck",
    "assert_trees_close",
    "check_model",
    "compare_rounding",
    "export_fixture",
    "load_fixture",
    "locate_divergence",
]
