"""Converting `flax.linen.BatchNorm` variables to bnjax's trees and back.

| flax.linen.BatchNorm            | bnjax (PyTorch `state_dict` names)        |
|---------------------------------|-------------------------------------------|
| `params/scale`                  | `params/weight`                           |
| `params/bias`                   | `params/bias`                             |
| `batch_stats/mean`              | `batch_stats/running_mean`                |
| `batch_stats/var` (**biased**)  | `batch_stats/running_var` (**unbiased**)  |
| (not tracked)                   | `batch_stats/num_batches_tracked`         |
| `momentum=0.99` (old value)     | `momentum=0.01` (new batch)               |

Flax's running variance is a moving average of the *biased* batch variance (divide
by n); PyTorch's and bnjax's is a moving average of the *unbiased* one (divide by
n - 1). Each update therefore differs by the factor n / (n - 1), where n is the
number of values per feature in a batch (batch size x spatial size). The converters
copy the variance unchanged by default, and rescale it by n / (n - 1) (or back) when
you pass `n`. If Flax and PyTorch had seen the same t batches of n values from the
initial variance 1, with Flax momentum b, then exactly

    torch_running_var = n / (n - 1) * flax_var - b**t / (n - 1),

so the rescaled value is right up to a term that vanishes as training goes on.

Momentum: `bnjax.momentum_from_flax` / `bnjax.momentum_to_flax`.
Nothing here imports flax: the functions take and return plain dicts of arrays
(a `FrozenDict` is accepted), and never modify their input.
"""

from bnjax._interop.flax_trees import deprecated_names as __getattr__  # noqa: F401 (old names, warned)
from bnjax._interop.flax_trees import from_flax as from_flax
from bnjax._interop.flax_trees import to_flax as to_flax
from bnjax._interop.flax_trees import variables_from_flax as variables_from_flax
from bnjax._interop.flax_trees import variables_to_flax as variables_to_flax

__all__ = [
    "from_flax",
    "to_flax",
    "variables_from_flax",
    "variables_to_flax",
]
