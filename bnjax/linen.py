"""`bnjax.linen.BatchNorm`: a `flax.linen` module with PyTorch's BatchNorm numbers.

The module only wires state: parameters live in the `params` collection (`weight`,
`bias`), running statistics in the `batch_stats` collection (`running_mean`,
`running_var`, `num_batches_tracked`, PyTorch's `state_dict` names), and every
number is computed by `bnjax.apply`.

    import bnjax.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(16, (3, 3))(x)
            x = bnjax.linen.BatchNorm()(x, train=train)
            return nn.relu(x)

    variables = Net().init(key, x, train=False)
    y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    y = Net().apply({**variables, **updates}, x, train=False)

Whole-model tools read each BatchNorm through its `bnjax.BatchNormReport` (settings
and batch moments), which the module sows into the collection `REPORTS` only when the
caller makes it mutable: `mutable=["batch_stats", bnjax.linen.REPORTS]`, then
`bnjax.collect_reports(updates[bnjax.linen.REPORTS])`.

This submodule imports `flax`; `import bnjax` alone does not.
"""

from bnjax._flax.linen import REPORTS as REPORTS
from bnjax._flax.linen import BatchNorm as BatchNorm

__all__ = [
    "REPORTS",
    "BatchNorm",
]
