"""Accumulation-aware training steps for models with BatchNorm (needs optax).

Gradient accumulation is where BatchNorm quietly goes wrong: each micro-batch is
normalized with its own statistics, and the running statistics move once per
micro-batch, not once per optimizer step. `make_train_step` builds one pure step
that runs k micro-batches under a single `lax.scan`, threads `batch_stats` through
them in order, reduces the gradients and applies one optax update, with a
documented choice of how the running statistics treat the micro-batches, a
`StatsPolicy` (a NamedTuple of pure `init`/`update`/`finish` functions):

| stats_policy               | running statistics after one step of k micro-batches |
|----------------------------|-------------------------------------------------------|
| `"micro"` / `micro()`      | k updates with the layer's momentum m (PyTorch's loop) |
| `"corrected"`/`corrected()`| k updates with m_k = 1 - (1 - m)^(1/k): decay as once |
| `"full"` / `full()`        | 1 update with the pooled mean and unbiased variance of all k*B |

The forward pass always normalizes each micro-batch with its own batch statistics.
`"corrected"` and `"full"` read each BatchNorm's momentum and batch moments from the
`bnjax.BatchNormReport`s that `loss_fn` returns (see `make_train_step`).
Frozen BatchNorm: `freeze_batchnorm`, `batchnorm_mask`. See docs/accumulation.md.
"""

from bnjax._training.frozen import batchnorm_mask as batchnorm_mask
from bnjax._training.frozen import freeze_batchnorm as freeze_batchnorm
from bnjax._training.policies import StatsPolicy as StatsPolicy
from bnjax._training.policies import corrected as corrected
from bnjax._training.policies import corrected_momentum as corrected_momentum
from bnjax._training.policies import full as full
from bnjax._training.policies import micro as micro
from bnjax._training.step import StepMetrics as StepMetrics
from bnjax._training.step import make_train_step as make_train_step
from bnjax._training.step import split_micro_batches as split_micro_batches

__all__ = [
    "StatsPolicy",
    "StepMetrics",
    "batchnorm_mask",
    "corrected",
    "corrected_momentum",
    "freeze_batchnorm",
    "full",
    "make_train_step",
    "micro",
    "split_micro_batches",
]
