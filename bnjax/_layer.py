"""A BatchNorm layer whose settings travel with it: `batch_norm(...)`, optax style.

`bnjax.batch_norm(momentum=..., eps=..., axis=...)` closes over a BatchNorm's
settings and returns a `BatchNormLayer`, a NamedTuple of pure functions (`init`,
`apply`, `normalize`, `update`, `report`) and the static, hashable
`BatchNormConfig` they were built from. A functional model states each layer's
settings once; whole-model tools read `config` (or a `BatchNormReport`'s) instead
of taking one value for every layer.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _core, _stats
from bnjax._conventions import PARAM_KEYS
from bnjax._validate import check_hyperparameters, check_train

Array = jax.Array
Params = dict[str, Array]
BatchStats = dict[str, Array]


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

    def __post_init__(self) -> None:
        check_hyperparameters(momentum=self.momentum, eps=self.eps)
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


class BatchNormLayer(NamedTuple):
    """A BatchNorm as pure functions that close over its `config` (see `batch_norm`).

    Attributes:
      init: `init(num_features) -> (params, batch_stats)`.
      apply: `apply(params, batch_stats, x, train, *, mask=None) -> (y, new_batch_stats)`.
      normalize: `normalize(params, batch_stats, x, train, *, mask=None) -> (y, moments)`.
      update: `update(batch_stats, moments) -> new_batch_stats`.
      report: `report(moments) -> BatchNormReport`, the layer's record for whole-model
        tools (`moments` may be None: an eval-mode call).
      config: the layer's static `BatchNormConfig`.
    """

    init: Callable[..., tuple[Params, BatchStats]]
    apply: Callable[..., tuple[Array, BatchStats]]
    normalize: Callable[..., tuple[Array, _stats.Moments | None]]
    update: Callable[..., BatchStats]
    report: Callable[..., Any]
    config: BatchNormConfig


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
    )
    return layer_from_config(config)


def layer_from_config(config: BatchNormConfig) -> BatchNormLayer:
    """The `BatchNormLayer` of a `BatchNormConfig` (what `batch_norm` returns)."""
    from bnjax._report import make_report  # the report type depends on the config type

    def init(num_features: int | Sequence[int]) -> tuple[Params, BatchStats]:
        return _core.init(
            num_features,
            affine=config.affine,
            bias=config.bias,
            track_running_stats=config.track_running_stats,
            dtype=config.dtype,
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
        )

    def update(batch_stats, moments):
        return _core.update_stats(batch_stats, moments, momentum=config.momentum)

    def apply(params, batch_stats, x, train, *, mask=None):
        y, moments = normalize(params, batch_stats, x, train, mask=mask)
        return y, update(batch_stats, moments)

    def report(moments):
        return make_report(moments, config)

    return BatchNormLayer(init, apply, normalize, update, report, config)


def flax_module_config(
    module: Any, *, affine: bool, bias: bool, track_running_stats: bool
) -> BatchNormConfig:
    """The `BatchNormConfig` of a Flax BatchNorm module (linen or nnx), from its attributes."""
    return BatchNormConfig(
        momentum=module.momentum,
        eps=module.epsilon,
        axis=module.axis,
        axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups,
        affine=affine,
        bias=bias,
        track_running_stats=track_running_stats,
        dtype=module.param_dtype,
    )


def param_keys(affine: bool, use_scale: bool, use_bias: bool, who: str) -> tuple[str, ...]:
    """A Flax-style module's `params` keys, from `affine`, `use_scale` and `use_bias`."""
    if not affine or (not use_scale and not use_bias):
        return ()
    if not use_scale:
        raise ValueError(
            f"{who}: use_scale=False with use_bias=True (a bias without a weight) has no "
            "PyTorch counterpart: a BatchNorm's params are {'weight', 'bias'}, {'weight'} "
            "alone (use_bias=False, PyTorch's bias=False) or none (use_scale=False, "
            "use_bias=False, or affine=False)."
        )
    return PARAM_KEYS if use_bias else ("weight",)


def resolve_train(
    who: str, train: Any, use_running_average: Any, default_use_running_average: Any
) -> bool:
    """The mode of one call of a Flax module: `train`, else `not use_running_average`.

    `default_use_running_average` is the module's attribute (None: no default).
    """
    for name, value in (
        ("use_running_average", use_running_average),
        ("self.use_running_average", default_use_running_average),
    ):
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"{who}: `{name}` must be a Python bool, got a traced value; mark it "
                "static under `jit` (e.g. `static_argnames`), or set it with "
                "`model.train()` / `model.eval()` (nnx)."
            )
    if train is not None:
        train = check_train(train)  # bnjax.apply's error for a traced or non-bool train
        if use_running_average is not None and train == bool(use_running_average):
            raise ValueError(
                f"{who}: got `train` and `use_running_average` that disagree "
                f"({train!r}, {use_running_average!r}); pass only `train`."
            )
        return train
    mode = use_running_average if use_running_average is not None else default_use_running_average
    if mode is None:
        raise ValueError(
            f"{who}: pass `train=True` (batch statistics, update the running statistics) "
            "or `train=False` (running statistics) to the call, e.g. "
            "`bnjax.linen.BatchNorm()(x, train=train)`."
        )
    if not isinstance(mode, (bool, np.bool_)):
        raise TypeError(
            f"{who}: `use_running_average` must be a Python bool (set it with "
            f"`model.train()` / `model.eval()` in nnx), got {mode!r}."
        )
    return not bool(mode)


def check_shared_stats_write(who: str, old: Any, new: Any) -> None:
    """Refuses to write per-member statistics into statistics shared across a `vmap`.

    Under `nn.vmap`/`nnx.vmap` with the statistics not mapped (`variable_axes` None,
    `in_axes=None` for the state) and no `axis_name`, each member computes its own
    batch statistics, which cannot be stored in the one shared copy (flax#4760);
    JAX would fail later with "vmap has mapped output ... but out_axes is None".
    """
    try:
        from jax._src.interpreters import batching
    except ImportError:  # pragma: no cover - a JAX without this module: no check
        return
    tracer = getattr(batching, "BatchTracer", None)

    def mapped(v: Any) -> bool:
        return tracer is not None and isinstance(v, tracer) and isinstance(v.batch_dim, int)

    if not mapped(new) or (mapped(old) and old._trace is new._trace):
        return  # nothing per member, or the statistics are mapped too (one copy each)
    raise ValueError(
        f"{who}: under `vmap` each member computes its own batch statistics, but the "
        "running statistics are one copy shared by all members (not mapped), so they "
        "cannot be written back (flax#4760). Either synchronize them: pass the vmap's "
        "axis name, `BatchNorm(..., axis_name=...)` (PyTorch's SyncBatchNorm: every "
        "member normalizes with the statistics of the whole batch); or keep one copy per "
        "member: map the statistics too (`nn.vmap(..., variable_axes={'batch_stats': 0})`, "
        "or split the BatchStat state with `in_axes=0` in `nnx.vmap`)."
    )
