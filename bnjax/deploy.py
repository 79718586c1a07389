"""Deployment and maintenance of BatchNorm: folding, precise BN, checks, checkpoints.

- Folding: `bn_scale_shift`, `fold_into_kernel`, `fold_batchnorms` turn an eval-mode
  BatchNorm into a per-channel multiply-add and fold it into the preceding layer.

See `docs/deployment.md`.
"""

from bnjax._fold import bn_scale_shift as bn_scale_shift
from bnjax._fold import fold_batchnorms as fold_batchnorms
from bnjax._fold import fold_into_kernel as fold_into_kernel

__all__ = [
    "bn_scale_shift",
    "fold_batchnorms",
    "fold_into_kernel",
]
