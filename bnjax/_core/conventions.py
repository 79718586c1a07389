"""PyTorch and Flax conventions of BatchNorm, in one place.

- Key names: a BatchNorm's `params` are `{"weight", "bias"}` (or `{"weight"}` alone
  for PyTorch's `bias=False`, or `{}`), its `batch_stats` are `{"running_mean",
  "running_var", "num_batches_tracked"}` (or `{}`): PyTorch's `state_dict` names.
- The one rule for "is this node a BatchNorm's statistics": a mapping whose keys are
  exactly `STAT_KEYS` (`is_batch_stats`).
- Plain dicts: Flax `FrozenDict`s, `nnx.State`s and other mappings become nested
  `dict`s (`to_plain_dict`).
- Momentum: PyTorch's `momentum` is the weight of the *new* batch,
  `running = (1 - momentum) * running + momentum * batch` (default 0.1); Flax's is
  the weight of the *old* value (default 0.99). The two are `1 - each other`. (Flax
  also stores the *biased* batch variance where PyTorch stores the unbiased one; see
  `bnjax.flax_interop` for converting trees.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PARAM_KEYS = ("weight", "bias")
STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")
# The key sets a BatchNorm's `params` may have: affine, PyTorch's `bias=False`, none.
PARAM_KEY_SETS = (frozenset(PARAM_KEYS), frozenset({"weight"}), frozenset())
_STAT_KEY_SET = frozenset(STAT_KEYS)
# Batch Renormalization's own statistics, beside STAT_KEYS in a renorm layer's dict.
RENORM_KEYS = ("renorm_mean", "renorm_std")
_RENORM_STAT_KEY_SET = _STAT_KEY_SET | frozenset(RENORM_KEYS)


def is_batch_stats(node: Any) -> bool:
    """Whether `node` is one BatchNorm's statistics: a mapping with exactly `STAT_KEYS`
    (and `RENORM_KEYS` for a Batch Renormalization layer)."""
    return isinstance(node, Mapping) and set(node) in (_STAT_KEY_SET, _RENORM_STAT_KEY_SET)


def to_plain_dict(tree: Any) -> Any:
    """Nested plain `dict`s from any nesting of mappings (`FrozenDict`, `nnx.State`).

    Leaves (and non-mapping containers) are returned as they are, except nnx
    `Variable` boxes, which become their values; the input is not modified.
    """
    if isinstance(tree, Mapping):
        return {k: to_plain_dict(v) for k, v in tree.items()}
    get_value = getattr(tree, "get_value", None)  # an nnx Variable
    if callable(get_value):
        return to_plain_dict(get_value())
    return tree


def momentum_from_flax(flax_momentum: float) -> float:
    """Converts Flax's momentum (weight of the old value) to PyTorch's/bnjax's.

    Args:
      flax_momentum: Flax's `BatchNorm(momentum=...)`, in [0, 1].

    Returns:
      The bnjax (PyTorch) momentum, `1 - flax_momentum`.

    Example:
      >>> bnjax.momentum_from_flax(0.9)
      0.1
    """
    check_unit_interval("flax_momentum", flax_momentum)
    return _round(1.0 - flax_momentum)


def momentum_to_flax(momentum: float) -> float:
    """Converts bnjax's (PyTorch's) momentum to Flax's.

    Args:
      momentum: the weight of the new batch, in [0, 1].

    Returns:
      Flax's momentum, `1 - momentum`.

    Example:
      >>> bnjax.momentum_to_flax(0.1)
      0.9
    """
    check_unit_interval("momentum", momentum)
    return _round(1.0 - momentum)


def _round(v: float) -> float:
    # 1 - 0.9 is 0.09999999999999998 in binary; 15 digits recover the intended value.
    return float(f"{v:.15g}")


def check_unit_interval(name: str, value: Any) -> None:
    """The one momentum range check: a Python number in [0, 1] (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
