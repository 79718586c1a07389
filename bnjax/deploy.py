"""Deployment and maintenance of BatchNorm: precise BN, folding, checks, checkpoints.

Each tool takes the model as it is: a `flax.linen` module and its variables, a
`flax.nnx` module, or a functional `apply_fn`; per-layer facts (batch moments, each
BatchNorm's own `eps`) come through `bnjax.BatchNormReport`.

- Precise BN: `update_bn` (PyTorch's `torch.optim.swa_utils.update_bn`, equal weight
  per batch) and `precise_bn` (exact statistics pooled over all elements).
- Folding: `fold` folds every BatchNorm of a model into the Conv or Dense that feeds
  it (pairs found, each BatchNorm's own eps, result checked) and returns something to
  run in eval mode; `bn_scale_shift`, `fold_into_kernel`, `fold_batchnorms` are the
  tree-level steps.
- The eval trap: `check_batch_independence` checks that eval-mode outputs of each
  example do not depend on its batch-mates or the batch size.
- Checkpoints: `save_checkpoint` / `restore_checkpoint` store a training state
  (params, batch_stats, opt_state, step) losslessly in one file; a corrupted or
  mismatched file raises `CheckpointError`. `save_sharded_checkpoint` /
  `restore_sharded_checkpoint` do the same for states sharded over many processes
  (Orbax; every process writes its shards; restore on any process count or mesh).

See `docs/deployment.md`.
"""

from bnjax._checkpoint.sharded import (
    restore_sharded_checkpoint as restore_sharded_checkpoint,
)
from bnjax._checkpoint.sharded import save_sharded_checkpoint as save_sharded_checkpoint
from bnjax._checkpoint.single import CheckpointError as CheckpointError
from bnjax._checkpoint.single import restore_checkpoint as restore_checkpoint
from bnjax._checkpoint.single import save_checkpoint as save_checkpoint
from bnjax._deploy.eval_check import EvalCheckReport as EvalCheckReport
from bnjax._deploy.eval_check import EvalTrapError as EvalTrapError
from bnjax._deploy.eval_check import check_batch_independence as check_batch_independence
from bnjax._deploy.fold import bn_scale_shift as bn_scale_shift
from bnjax._deploy.fold import fold_batchnorms as fold_batchnorms
from bnjax._deploy.fold import fold_into_kernel as fold_into_kernel
from bnjax._deploy.fold_any import fold as fold
from bnjax._deploy.fold_model import FoldedBatchNorm as FoldedBatchNorm
from bnjax._deploy.fold_model import FoldedFunctional as FoldedFunctional
from bnjax._deploy.fold_model import FoldedLinen as FoldedLinen
from bnjax._deploy.fold_model import FoldPair as FoldPair
from bnjax._deploy.precise_bn import precise_bn as precise_bn
from bnjax._deploy.precise_bn import update_bn as update_bn

__all__ = [
    "CheckpointError",
    "EvalCheckReport",
    "EvalTrapError",
    "FoldPair",
    "FoldedBatchNorm",
    "FoldedFunctional",
    "FoldedLinen",
    "bn_scale_shift",
    "check_batch_independence",
    "fold",
    "fold_batchnorms",
    "fold_into_kernel",
    "precise_bn",
    "restore_checkpoint",
    "restore_sharded_checkpoint",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "update_bn",
]
