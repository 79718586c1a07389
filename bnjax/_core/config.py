"""`BatchNormConfig`: the one list of a BatchNorm's settings.

The functional core's keyword arguments, the `bnjax.batch_norm` factory, the linen and
nnx modules and every whole-model tool read a layer's settings from this one frozen,
hashable dataclass, so a new option reaches all of them by construction.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Hashable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from bnjax._core import ghost as _ghost
from bnjax._core import renorm as _renorm
from bnjax._core.conventions import PARAM_KEYS
from bnjax._core.validate import check_hyperparameters


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """A BatchNorm's static settings: hashable, comparable, readable.

    Attributes:
      momentum: PyTorch's momentum (weight of the new batch), or None (cumulative).
      eps: added to the variance, > 0.
      axis: the feature axis (an int) or axes (a tuple of ints).
      axis_name: the named axis batch statistics are synchronized over, or None.
      axis_index_groups: sub-groups of `axis_name` (a tuple of tuples), or None.
      affine: whether the layer has a learnable `weight`.
      bias: whether it also has a `bias` (False: PyTorch's `bias=False`).
      track_running_stats: whether it keeps running statistics.
      dtype: the dtype of `weight` and `bias`.
      renorm: a `bnjax.Renorm` (Batch Renormalization) or None.
      virtual_batch_size: the ghost-batch size, or None.

    Example:
      >>> cfg = bnjax.BatchNormConfig(eps=1e-3, axis=1)
      >>> cfg.eps, cfg.momentum, hash(cfg) == hash(bnjax.BatchNormConfig(eps=1e-3, axis=1))
      (0.001, 0.1, True)
    """

    momentum: float | None = 0.1
    eps: float = 1e-5
    axis: int | tuple[int, ...] = -1
    axis_name: Hashable = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = True
    dtype: Any = jnp.float32
    renorm: _renorm.Renorm | None = None
    virtual_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_hyperparameters(momentum=self.momentum, eps=self.eps)
        _renorm.check_renorm(self.renorm, "bnjax.BatchNormConfig")
        if self.renorm is not None and not self.track_running_stats:
            raise ValueError(
                "bnjax.BatchNormConfig: `renorm` needs running statistics; got "
                "track_running_stats=False."
            )
        vbs = _ghost.check_virtual_batch_size(
            self.virtual_batch_size, None, (), "bnjax.BatchNormConfig"
        )
        object.__setattr__(self, "virtual_batch_size", vbs)
        axis = self.axis
        if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
            axis = int(axis)
        elif (
            isinstance(axis, Sequence)
            and axis
            and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis)
        ):
            axis = tuple(int(a) for a in axis)
        else:
            raise ValueError(
                f"bnjax.BatchNormConfig: `axis` must be an int or a non-empty tuple of ints, "
                f"got {self.axis!r}."
            )
        object.__setattr__(self, "axis", axis)
        if self.axis_index_groups is not None:
            groups = tuple(tuple(int(i) for i in g) for g in self.axis_index_groups)
            object.__setattr__(self, "axis_index_groups", groups)
        if isinstance(self.eps, numbers.Real):
            object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    @property
    def param_keys(self) -> tuple[str, ...]:
        """The keys of this layer's `params`: `("weight", "bias")`, `("weight",)` or `()`."""
        if not self.affine:
            return ()
        return PARAM_KEYS if self.bias else ("weight",)
