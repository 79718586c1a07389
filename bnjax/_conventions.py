"""PyTorch and Flax conventions for BatchNorm's momentum, in one place.

PyTorch's `momentum` is the weight of the *new* batch:
`running = (1 - momentum) * running + momentum * batch` (default 0.1).
Flax's `momentum` is the weight of the *old* value:
`running = momentum * running + (1 - momentum) * batch` (default 0.99).
The two are `1 - each other`. (Flax also stores the *biased* batch variance where
PyTorch stores the unbiased one; see `bnjax.flax_interop` for converting trees.)
"""

from __future__ import annotations


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
    _check_unit_interval("flax_momentum", flax_momentum)
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
    _check_unit_interval("momentum", momentum)
    return _round(1.0 - momentum)


def _round(v: float) -> float:
    # 1 - 0.9 is 0.09999999999999998 in binary; 15 digits recover the intended value.
    return float(f"{v:.15g}")


def _check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
