"""The implementation behind `bnjax.nnx` (its docstring is the guide).

`bnjax.nnx.BatchNorm`: a `flax.nnx` module with PyTorch's BatchNorm numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._core import functional as _core
from bnjax._core import renorm as _renorm
from bnjax._core.config import BatchNormConfig
from bnjax._core.extras import needs
from bnjax._core.layer import layer_from_config
from bnjax._core.report import REPORT_NAME
from bnjax._flax.glue import (
    check_shared_stats_write,
    flax_module_config,
    param_keys,
    resolve_train,
    stats_dtype_of,
)

with needs("bnjax.nnx", "flax"):
    from flax import nnx

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["BatchNorm", "Reports"]


class Reports(nnx.Variable):
    """The variable type a `BatchNorm` sows its `bnjax.BatchNormReport` as.

    Opt-in: reports are recorded only under `nnx.capture(fn, bnjax.nnx.Reports)`,
    so a model's ordinary state never holds them.

    Example:
      >>> bn = bnjax.nnx.BatchNorm(3, momentum=0.2)
      >>> y, reports = nnx.capture(bn, bnjax.nnx.Reports)(jnp.ones((4, 3)))
      >>> bnjax.collect_reports(reports).config.momentum
      0.2
    """


_ONES = nnx.initializers.ones
_ZEROS = nnx.initializers.zeros


class BatchNorm(nnx.Module):
    r"""BatchNorm as a `flax.nnx` module, with PyTorch's numbers.

    $$y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \text{weight} + \text{bias}$$

    PyTorch's conventions: `momentum` is the weight of the *new* batch (`0.1`, Flax's
    `0.9`), the running variance is the *unbiased* one, and evaluation without
    tracked statistics normalizes with the batch statistics. All arithmetic is
    `bnjax.apply`; see it for the exact update rule.

    Args:
      num_features: the number of features C (or the features' shape, a tuple, for
        several feature axes).
      momentum: PyTorch's momentum, the weight of the new batch; `None` for a
        cumulative average. `bnjax.momentum_from_flax` converts Flax's.
      epsilon: added to the variance, > 0.
      affine: whether to learn `weight` and `bias` (`nnx.Param`).
      use_scale: Flax's switch for `weight` (with `affine`).
      use_bias: Flax's switch for `bias` (with `affine`); `use_bias=False` is
        PyTorch's `BatchNorm2d(C, bias=False)` (a `weight` alone). A bias without a
        scale has no PyTorch counterpart and is refused.
      track_running_stats: whether to keep running statistics (`nnx.BatchStat`).
      axis: the feature axis (or a tuple of them): `-1` channels-last, `1` NCHW.
      axis_name: a named axis (`nnx.vmap`, `nnx.pmap`, `shard_map`) to synchronize
        batch statistics over, as PyTorch's `SyncBatchNorm`.
      axis_index_groups: sub-groups of `axis_name` to synchronize within.
      use_running_average: the mode: `False` (default) trains, `True` evaluates.
        `model.train()` / `model.eval()` set it on every submodule.
      dtype: if set, `x` is cast to it first, and the output has it; otherwise the
        output has `x`'s dtype.
      param_dtype: the dtype of `weight` and `bias`. The running statistics follow it
        when it is wider than float32 (float64 parameters, float64 statistics);
        otherwise they are float32 (see `stats_dtype`).
      weight_init: initializer of `weight`, `(key, shape, dtype) -> Array` (ones).
      bias_init: initializer of `bias` (zeros).
      rngs: `nnx.Rngs`, needed only for initializers that use a key.
      renorm: a `bnjax.Renorm` for Batch Renormalization (adds the `nnx.BatchStat`s
        `renorm_mean`, `renorm_std`), or None.
      virtual_batch_size: the ghost-batch size (axis 0 cut into sub-batches of this
        many rows, each normalized with its own statistics), or None. Training
        only: evaluation with running statistics takes any batch size.
      stats_dtype: the dtype of the running statistics; None (default) is the wider
        of `param_dtype` and float32.

    Raises:
      ValueError: bad `num_features`, `momentum` or `epsilon`; a custom initializer
        without `rngs`.

    Example:
      >>> bn = bnjax.nnx.BatchNorm(3)
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))
      >>> bn.running_mean[...].round(4)
      Array([0.45, 0.55, 0.65], dtype=float32)
      >>> bn.eval()
      >>> bn.training
      False
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        momentum: float | None = 0.1,
        epsilon: float = 1e-5,
        affine: bool = True,
        use_scale: bool = True,
        use_bias: bool = True,
        track_running_stats: bool = True,
        axis: int | Sequence[int] = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_running_average: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        weight_init: Initializer = _ONES,
        bias_init: Initializer = _ZEROS,
        rngs: nnx.Rngs | None = None,
        renorm: _renorm.Renorm | None = None,
        virtual_batch_size: int | None = None,
        stats_dtype: Any = None,
    ):
        keys = param_keys(affine, use_scale, use_bias, "bnjax.nnx.BatchNorm")
        config = BatchNormConfig(
            momentum=momentum,
            eps=epsilon,
            axis=axis,  # type: ignore[arg-type]
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            affine=bool(keys),
            bias="bias" in keys,
            track_running_stats=track_running_stats,
            dtype=param_dtype,
            renorm=renorm,
            virtual_batch_size=virtual_batch_size,
        )
        params, batch_stats = layer_from_config(config).init(num_features)
        sdtype = stats_dtype_of(param_dtype, stats_dtype)
        batch_stats = {
            k: v if k == "num_batches_tracked" else v.astype(sdtype) for k, v in batch_stats.items()
        }
        shape = _core.feature_shape_from_num_features(num_features)
        self.weight: nnx.Param | None = nnx.data(None)
        self.bias: nnx.Param | None = nnx.data(None)
        if keys:
            default = weight_init is _ONES and bias_init is _ZEROS
            if rngs is None and not default:
                raise ValueError(
                    "bnjax.nnx.BatchNorm: a custom `weight_init` / `bias_init` needs a key; "
                    "pass `rngs=nnx.Rngs(0)`."
                )
            if default:
                self.weight = nnx.Param(params["weight"])
                if "bias" in keys:
                    self.bias = nnx.Param(params["bias"])
            else:
                self.weight = nnx.Param(weight_init(rngs.params(), shape, param_dtype))
                if "bias" in keys:
                    self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype))
        self.running_mean: nnx.BatchStat | None = nnx.data(None)
        self.running_var: nnx.BatchStat | None = nnx.data(None)
        self.num_batches_tracked: nnx.BatchStat | None = nnx.data(None)
        if track_running_stats:
            self.running_mean = nnx.BatchStat(batch_stats["running_mean"])
            self.running_var = nnx.BatchStat(batch_stats["running_var"])
            self.num_batches_tracked = nnx.BatchStat(batch_stats["num_batches_tracked"])
        if renorm is not None:  # Batch Renormalization's own statistics
            self.renorm_mean = nnx.BatchStat(batch_stats["renorm_mean"])
            self.renorm_std = nnx.BatchStat(batch_stats["renorm_std"])

        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.affine = affine
        self.use_scale = use_scale
        self.use_bias = use_bias
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.stats_dtype = stats_dtype
        self.renorm = nnx.static(renorm)
        self.virtual_batch_size = virtual_batch_size

    @property
    def config(self) -> BatchNormConfig:
        """This module's settings as a `bnjax.BatchNormConfig` (what its reports carry)."""
        return flax_module_config(
            self,
            affine=self.weight is not None,
            bias=self.bias is not None,
            track_running_stats=self.running_mean is not None,
        )

    @property
    def training(self) -> bool:
        """PyTorch's `module.training`: `not use_running_average`."""
        return not self.use_running_average

    def __call__(
        self,
        x: jax.typing.ArrayLike,
        *,
        train: bool | None = None,
        use_running_average: bool | None = None,
        mask: jax.typing.ArrayLike | None = None,
    ) -> Array:
        """Normalizes `x` per feature and, in training mode, updates the statistics.

        Args:
          x: a floating-point array; `axis` names its feature axis.
          train: overrides the module's mode for this call (a Python bool).
          use_running_average: Flax's spelling of the override, `not train`.
          mask: a boolean array of `x`'s shape without the feature axes; only `True`
            positions count toward the statistics.

        Returns:
          The normalized array, `x`'s shape, with `x`'s dtype (or `dtype`).

        Raises:
          TypeError: a traced or non-bool mode (it selects a different computation).
          ValueError: every bad input `bnjax.apply` rejects (feature size, shapes).
        """
        train = resolve_train(
            "bnjax.nnx.BatchNorm", train, use_running_average, self.use_running_average
        )
        x = jnp.asarray(x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        params = {}
        if self.weight is not None:
            params["weight"] = self.weight[...]
        if self.bias is not None:
            params["bias"] = self.bias[...]
        stats = {}
        if self.running_mean is not None:
            stats = {
                "running_mean": self.running_mean[...],
                "running_var": self.running_var[...],
                "num_batches_tracked": self.num_batches_tracked[...],
            }
        renorm = self.renorm
        if renorm is not None and stats:
            stats.update({k: getattr(self, k)[...] for k in _renorm.RENORM_KEYS})
        layer = layer_from_config(self.config)
        y, moments = layer.normalize(params, stats, x, train, mask=mask)
        new_stats = layer.update_stats(stats, moments)
        # The report channel: opt-in, only under `nnx.capture(..., Reports)`.
        if hasattr(self, "__captures__"):
            self.sow(Reports, REPORT_NAME, layer.report(moments))
        if train and stats:
            check_shared_stats_write(
                "bnjax.nnx.BatchNorm", stats["running_mean"], new_stats["running_mean"]
            )
            # Running statistics are buffers: no gradient flows into them (PyTorch
            # updates them under `no_grad`).
            self.running_mean[...] = jax.lax.stop_gradient(new_stats["running_mean"])
            self.running_var[...] = jax.lax.stop_gradient(new_stats["running_var"])
            self.num_batches_tracked[...] = new_stats["num_batches_tracked"]
            if renorm is not None:  # Batch Renormalization's own statistics
                for k in _renorm.RENORM_KEYS:
                    getattr(self, k)[...] = jax.lax.stop_gradient(new_stats[k])
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by `nnx.view(model, use_running_average=...)`.

        Args:
          use_running_average: the mode of the view (`True` evaluates).

        Returns:
          None; sets the attribute on the view's copy of the module.

        Example:
          >>> bn = bnjax.nnx.BatchNorm(3)
          >>> nnx.view(bn, use_running_average=True).training, bn.training
          (False, True)
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
