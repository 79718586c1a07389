"""A BatchNorm layer whose settings travel with it: `batch_norm(...)`, optax style.

`bnjax.batch_norm(momentum=..., eps=..., axis=...)` closes over a BatchNorm's
settings and returns a `BatchNormLayer`, a NamedTuple of pure functions (`init`,
`apply`, `normalize`, `update_stats`, `report`) and the static, hashable
`BatchNormConfig` they were built from. A functional model states each layer's
settings once; whole-model tools read `config` (or a `BatchNormReport`'s) instead
of taking one value for every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax._core import deprecation
from bnjax._core import functional as _core
from bnjax._core import renorm as _renorm
from bnjax._core import stats as _stats
from bnjax._core.config import BatchNormConfig
from bnjax._core.report import make_report

Array = jax.Array
Params = dict[str, Array]
BatchStats = dict[str, Array]


class BatchNormLayer(NamedTuple):
    """A BatchNorm as pure functions that close over its `config` (see `batch_norm`).

    Attributes:
      init: `init(num_features) -> (params, batch_stats)`.
      apply: `apply(params, batch_stats, x, train, *, mask=None) -> (y, new_batch_stats)`.
      normalize: `normalize(params, batch_stats, x, train, *, mask=None) -> (y, moments)`.
      update_stats: `update_stats(batch_stats, moments) -> new_batch_stats`, as
        `bnjax.update_stats` with the layer's momentum (`update` is its deprecated
        old name).
      report: `report(moments) -> BatchNormReport`, the layer's record for whole-model
        tools (`moments` may be None: an eval-mode call).
      config: the layer's static `BatchNormConfig`.
    """

    init: Callable[..., tuple[Params, BatchStats]]
    apply: Callable[..., tuple[Array, BatchStats]]
    normalize: Callable[..., tuple[Array, _stats.Moments | None]]
    update_stats: Callable[..., BatchStats]
    report: Callable[..., Any]
    config: BatchNormConfig

    @property
    def update(self) -> Callable[..., BatchStats]:
        """Deprecated: `update_stats` (the name `bnjax.update_stats` has)."""
        deprecation.warn("BatchNormLayer.update", "BatchNormLayer.update_stats")
        return self.update_stats


def batch_norm(
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: Hashable = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    affine: bool = True,
    bias: bool = True,
    track_running_stats: bool = True,
    dtype: Any = jnp.float32,
    renorm: _renorm.Renorm | None = None,
    virtual_batch_size: int | None = None,
) -> BatchNormLayer:
    """Builds a BatchNorm layer whose settings travel with it (an optax-style factory).

    `bn = bnjax.batch_norm(eps=1e-3)` then `bn.init(C)` and
    `bn.apply(params, batch_stats, x, train)` are `bnjax.init` / `bnjax.apply` with
    these settings; `bn.config` holds them for tools that need each layer's own
    `eps`, `momentum` or `axis` (folding, precise BN, the training step).

    Args:
      momentum: PyTorch's momentum (weight of the new batch), or None (cumulative).
      eps: added to the variance, > 0.
      axis: the feature axis or axes (`-1` channels-last, `1` NCHW).
      axis_name: a named axis to synchronize batch statistics over.
      axis_index_groups: sub-groups of `axis_name` to synchronize within.
      affine: whether `init` creates a learnable `weight` (and `bias`).
      bias: with `affine`, whether `init` creates `bias` (PyTorch's `bias=`).
      track_running_stats: whether `init` creates running statistics.
      dtype: the dtype of `weight` and `bias`.
      renorm: a `bnjax.Renorm` for Batch Renormalization (`init` then creates its
        statistics), or None.
      virtual_batch_size: the ghost-batch size (axis 0 cut into sub-batches of this
        many rows, each normalized with its own statistics), or None. Training
        only: evaluation with running statistics takes any batch size.

    Returns:
      A `BatchNormLayer` of pure functions and its `BatchNormConfig`.

    Raises:
      ValueError: `eps <= 0`, `momentum` outside [0, 1], or a malformed `axis`.

    Example:
      >>> bn = bnjax.batch_norm(eps=1e-3, axis=1)
      >>> params, batch_stats = bn.init(3)
      >>> y, batch_stats = bn.apply(params, batch_stats, jnp.ones((2, 3, 4)), train=True)
      >>> bn.config.eps, int(batch_stats["num_batches_tracked"])
      (0.001, 1)
    """
    config = BatchNormConfig(
        momentum=momentum,
        eps=eps,
        axis=axis,  # type: ignore[arg-type]
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,  # type: ignore[arg-type]
        affine=affine,
        bias=bias,
        track_running_stats=track_running_stats,
        dtype=dtype,
        renorm=renorm,
        virtual_batch_size=virtual_batch_size,
    )
    return layer_from_config(config)


def layer_from_config(config: BatchNormConfig) -> BatchNormLayer:
    """The `BatchNormLayer` of a `BatchNormConfig` (what `batch_norm` returns)."""

    def init(num_features: int | Sequence[int]) -> tuple[Params, BatchStats]:
        return _core.init(
            num_features,
            affine=config.affine,
            bias=config.bias,
            track_running_stats=config.track_running_stats,
            dtype=config.dtype,
            renorm=config.renorm is not None,
        )

    def normalize(params, batch_stats, x, train, *, mask=None):
        return _core.normalize(
            params,
            batch_stats,
            x,
            train,
            eps=config.eps,
            axis=config.axis,
            axis_name=config.axis_name,
            axis_index_groups=config.axis_index_groups,
            mask=mask,
            renorm=config.renorm,
            virtual_batch_size=config.virtual_batch_size,
        )

    def update_stats(batch_stats, moments):
        return _core.update_stats(
            batch_stats, moments, momentum=config.momentum, renorm=config.renorm, eps=config.eps
        )

    def apply(params, batch_stats, x, train, *, mask=None):
        y, moments = normalize(params, batch_stats, x, train, mask=mask)
        return y, update_stats(batch_stats, moments)

    # Reports carry static settings: a bound passed as an array is not kept there.
    report_config = dataclasses.replace(config, renorm=_renorm.static_settings(config.renorm))

    def report(moments):
        return make_report(moments, report_config)

    return BatchNormLayer(init, apply, normalize, update_stats, report, config)
