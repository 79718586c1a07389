"""bnjax: BatchNorm for JAX as pure functions, with PyTorch's numbers.

The core is two pure functions:

    params, batch_stats = bnjax.init(num_features)
    y, batch_stats = bnjax.apply(params, batch_stats, x, train=True)

`apply` is two public steps, `bnjax.normalize` (y and the batch moments) and
`bnjax.update_stats` (the running statistics from moments). `bnjax.batch_norm(...)`
builds a layer whose settings travel with it; its `BatchNormReport`s are the one
channel whole-model tools read layers through (`bnjax.collect_reports`).

Optional parts live in submodules that pull in their own dependencies:
`bnjax.linen` / `bnjax.nnx` (Flax modules), `bnjax.flax_interop` (Flax variable
trees), `bnjax.training` (optax), `bnjax.interop` (PyTorch state_dict, NumPy only),
`bnjax.deploy` (folding, precise BN, the eval-trap check, checkpoints).
"""

from importlib.metadata import PackageNotFoundError, version

from bnjax._core.config import BatchNormConfig as BatchNormConfig
from bnjax._core.conventions import STAT_KEYS as STAT_KEYS
from bnjax._core.conventions import momentum_from_flax as momentum_from_flax
from bnjax._core.conventions import momentum_to_flax as momentum_to_flax
from bnjax._core.functional import apply as apply
from bnjax._core.functional import batch_moments as batch_moments
from bnjax._core.functional import init as init
from bnjax._core.functional import normalize as normalize
from bnjax._core.functional import update_stats as update_stats
from bnjax._core.layer import BatchNormLayer as BatchNormLayer
from bnjax._core.layer import batch_norm as batch_norm
from bnjax._core.renorm import Renorm as Renorm
from bnjax._core.report import BatchNormReport as BatchNormReport
from bnjax._core.report import collect_reports as collect_reports
from bnjax._core.stats import Moments as Moments

try:
    __version__ = version("bnjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "STAT_KEYS",
    "BatchNormConfig",
    "BatchNormLayer",
    "BatchNormReport",
    "Moments",
    "Renorm",
    "apply",
    "batch_moments",
    "batch_norm",
    "collect_reports",
    "init",
    "momentum_from_flax",
    "momentum_to_flax",
    "normalize",
    "update_stats",
]
