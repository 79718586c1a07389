"""bnjax: BatchNorm for JAX as pure functions, with PyTorch's numbers.

The core is two pure functions:

    params, batch_stats = bnjax.init(num_features)
    y, batch_stats = bnjax.apply(params, batch_stats, x, train=True)

Optional parts live in submodules that pull in their own dependencies:
`bnjax.linen` / `bnjax.nnx` (Flax modules), `bnjax.flax_interop` (Flax variable
trees), `bnjax.training` (optax), `bnjax.interop` (PyTorch state_dict, NumPy only),
`bnjax.deploy` (folding, precise BN, the eval-trap check, checkpoints).
"""

from importlib.metadata import PackageNotFoundError, version

from bnjax._conventions import momentum_from_flax as momentum_from_flax
from bnjax._conventions import momentum_to_flax as momentum_to_flax
from bnjax._core import apply as apply
from bnjax._core import init as init
from bnjax._stats import Moments as Moments
from bnjax._stats import batch_moments as batch_moments

try:
    __version__ = version("bnjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Moments",
    "apply",
    "batch_moments",
    "init",
    "momentum_from_flax",
    "momentum_to_flax",
]
