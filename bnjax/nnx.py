"""`bnjax.nnx.BatchNorm`: a `flax.nnx` module with PyTorch's BatchNorm numbers.

The module only wires state: `weight` and `bias` are `nnx.Param`s, `running_mean`,
`running_var` and `num_batches_tracked` are `nnx.BatchStat`s (PyTorch's `state_dict`
names), and every number is computed by `bnjax.apply`. It starts in training mode,
as a PyTorch module does; `model.eval()` / `model.train()` switch it (they set
`use_running_average`, the attribute Flax's own BatchNorm uses).

    import bnjax.nnx

    bn = bnjax.nnx.BatchNorm(16)
    y = bn(x)            # training: batch statistics, running statistics updated
    bn.eval()
    y = bn(x)            # running statistics

State can be taken out and threaded explicitly with `nnx.split` / `nnx.merge`:

    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

Whole-model tools read each BatchNorm through its `bnjax.BatchNormReport` (settings
and batch moments), recorded only under `nnx.capture(model, bnjax.nnx.Reports)`:

    y, reports = nnx.capture(model, bnjax.nnx.Reports)(x)
    reports = bnjax.collect_reports(reports)   # aligned with the BatchStat paths

This submodule imports `flax`; `import bnjax` alone does not.
"""

from bnjax._flax.nnx import BatchNorm as BatchNorm
from bnjax._flax.nnx import Reports as Reports

__all__ = [
    "BatchNorm",
    "Reports",
]
