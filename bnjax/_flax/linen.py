"""The implementation behind `bnjax.linen` (its docstring is the guide).

`bnjax.linen.BatchNorm`: a `flax.linen` module with PyTorch's BatchNorm numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._core import functional as _core
from bnjax._core import renorm as _renorm
from bnjax._core.config import BatchNormConfig
from bnjax._core.conventions import STAT_KEYS
from bnjax._core.extras import needs
from bnjax._core.layer import layer_from_config
from bnjax._core.report import REPORT_NAME
from bnjax._core.validate import check_keys, feature_shape_of, normalize_axes
from bnjax._flax.glue import (
    check_shared_stats_write,
    flax_module_config,
    param_keys,
    resolve_train,
    stats_dtype_of,
)

with needs("bnjax.linen", "flax"):
    import flax.linen as nn
    from flax.core import meta

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["REPORTS", "BatchNorm"]

#: The Flax collection a `BatchNorm` sows its `bnjax.BatchNormReport` into, when the
#: caller makes it mutable: `model.apply(..., mutable=["batch_stats", REPORTS])`.
REPORTS = "bn_reports"


class BatchNorm(nn.Module):
    r"""BatchNorm as a `flax.linen` module, with PyTorch's numbers.

    $$y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \text{weight} + \text{bias}$$

    A drop-in for `flax.linen.BatchNorm` with PyTorch's conventions: `momentum` is the
    weight of the *new* batch (`0.1`, Flax's `0.9`), the running variance is the
    *unbiased* one, and `train=False` without tracked statistics normalizes with the
    batch statistics (PyTorch's `track_running_stats=False`). All arithmetic is
    `bnjax.apply`; see it for the exact update rule.

    Attributes:
      num_features: the number of features C (or the features' shape for several
        feature axes); `None` infers it from the input on first use.
      momentum: PyTorch's momentum, the weight of the new batch; `None` for a
        cumulative average. `bnjax.momentum_from_flax` converts Flax's.
      epsilon: added to the variance, > 0.
      affine: whether to learn a per-feature `weight` and `bias` (`params`).
      use_scale: Flax's switch for `weight` (with `affine`).
      use_bias: Flax's switch for `bias` (with `affine`); `use_bias=False` is
        PyTorch's `BatchNorm2d(C, bias=False)`, params `{"weight"}` alone. A bias
        without a scale (`use_scale=False, use_bias=True`) has no PyTorch
        counterpart and is refused.
      track_running_stats: whether to keep running statistics in `batch_stats`.
      axis: the feature axis (or a tuple of them): `-1` channels-last, `1` NCHW.
      axis_name: a named axis (`nn.vmap`, `pmap`, `shard_map`) to synchronize batch
        statistics over, as PyTorch's `SyncBatchNorm`. `model.init` may run outside
        the mapped function (as in Flax): the name is then ignored while initializing.
      axis_index_groups: sub-groups of `axis_name` to synchronize within.
      use_running_average: Flax-style switch, the opposite of `train`; used only when
        the call passes neither `train` nor `use_running_average`.
      dtype: if set, `x` is cast to it first, and the output has it; otherwise the
        output has `x`'s dtype.
      param_dtype: the dtype of `weight` and `bias`. The running statistics follow it
        when it is wider than float32 (float64 parameters, float64 statistics);
        otherwise they are float32 (see `stats_dtype`).
      weight_init: initializer of `weight`, `(key, shape, dtype) -> Array` (ones).
      bias_init: initializer of `bias` (zeros).
      renorm: a `bnjax.Renorm` for Batch Renormalization (its statistics
        `renorm_mean`, `renorm_std` live in `batch_stats` too), or None.
      virtual_batch_size: the ghost-batch size (axis 0 cut into sub-batches of this
        many rows, each normalized with its own statistics), or None. Training
        only: evaluation with running statistics takes any batch size.
      stats_dtype: the dtype of the running statistics; None (default) is the wider
        of `param_dtype` and float32.

    Example:
      >>> bn = bnjax.linen.BatchNorm()
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x, train=False)
      >>> y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
      >>> updates["batch_stats"]["running_mean"].round(4)
      Array([0.45, 0.55, 0.65], dtype=float32)
    """

    num_features: int | Sequence[int] | None = None
    momentum: float | None = 0.1
    epsilon: float = 1e-5
    affine: bool = True
    use_scale: bool = True
    use_bias: bool = True
    track_running_stats: bool = True
    axis: int | Sequence[int] = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_running_average: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    weight_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    renorm: _renorm.Renorm | None = None
    virtual_batch_size: int | None = None
    stats_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: jax.typing.ArrayLike,
        train: bool | None = None,
        *,
        use_running_average: bool | None = None,
        mask: jax.typing.ArrayLike | None = None,
    ) -> Array:
        """Normalizes `x` per feature and, when training, updates `batch_stats`.

        Args:
          x: a floating-point array; `axis` names its feature axis.
          train: a Python bool (static under `jit`): batch statistics and a running
            statistics update (True), or the running statistics (False).
          use_running_average: Flax's spelling, `not train`; give one of the two.
          mask: a boolean array of `x`'s shape without the feature axes; only `True`
            positions count toward the statistics.

        Returns:
          The normalized array, `x`'s shape, with `x`'s dtype (or `dtype`).

        Raises:
          TypeError: `train` is traced or not a bool (mark it static under `jit`).
          ValueError: feature sizes that disagree with the stored variables,
            variables with missing or unexpected names (e.g. a `flax.linen.BatchNorm`
            tree: convert it with `bnjax.flax_interop`), training without a mutable
            `batch_stats` collection, and every bad input `bnjax.apply` rejects.
        """
        train = resolve_train(
            "bnjax.linen.BatchNorm", train, use_running_average, self.use_running_average
        )
        config = self.config  # validates momentum, eps, use_scale/use_bias
        x = jnp.asarray(x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        axes = normalize_axes(self.axis, x.shape)
        features = feature_shape_of(x.shape, axes)
        if self.num_features is not None:
            features = _core.feature_shape_from_num_features(self.num_features)

        initializing = self.is_initializing()
        # `model.init` may run outside the mapped function (as in Flax): there the
        # axis name is unbound and the statistics are local.
        sync = self.axis_name is not None and (not initializing or _is_bound(self.axis_name))
        params = self._collection(
            "params",
            config.param_keys,
            lambda name, shape: self.param(
                name,
                self.weight_init if name == "weight" else self.bias_init,
                shape,
                self.param_dtype,
            ),
            features,
        )
        variables = {}
        if self.track_running_stats:
            if train and not initializing and not self.is_mutable_collection("batch_stats"):
                raise ValueError(
                    f"bnjax.linen.BatchNorm at '{self._path()}': training updates the running "
                    "statistics in the 'batch_stats' collection, which is not mutable here. "
                    "Call `model.apply(variables, x, train=True, mutable=['batch_stats'])`, "
                    "or use `train=False` for the running statistics."
                )

            sdtype = stats_dtype_of(self.param_dtype, self.stats_dtype)

            def initial(name: str, shape: tuple[int, ...]) -> Array:
                value = _core.init(shape, affine=False, renorm=config.renorm is not None)[1][name]
                return value if name == "num_batches_tracked" else value.astype(sdtype)

            def make_stat(name: str, shape: tuple[int, ...]) -> Array:
                variables[name] = self.variable("batch_stats", name, lambda: initial(name, shape))
                return variables[name].value

            stat_keys = STAT_KEYS + (_renorm.RENORM_KEYS if config.renorm is not None else ())
            batch_stats = self._collection("batch_stats", stat_keys, make_stat, features)
        else:
            batch_stats = self._collection("batch_stats", (), None, features)

        if not sync:
            config = dataclasses.replace(config, axis_name=None, axis_index_groups=None)
        layer = layer_from_config(config)
        y, moments = layer.normalize(params, batch_stats, x, train, mask=mask)
        new_batch_stats = layer.update_stats(batch_stats, moments)
        # The report channel: only for callers that make REPORTS mutable, never in init.
        if not initializing and self.is_mutable_collection(REPORTS):
            self.sow(REPORTS, REPORT_NAME, layer.report(moments))
        # Like Flax (and like constructing a PyTorch module), `init` leaves the
        # statistics at their initial values. Running statistics are buffers:
        # no gradient flows into them, as under PyTorch's `no_grad` update.
        if train and variables and not initializing:
            check_shared_stats_write(
                f"bnjax.linen.BatchNorm at '{self._path()}'",
                batch_stats["running_mean"],
                new_batch_stats["running_mean"],
            )
            for name, var in variables.items():
                var.value = jax.lax.stop_gradient(new_batch_stats[name])
        return y

    @property
    def config(self) -> BatchNormConfig:
        """This module's settings as a `bnjax.BatchNormConfig` (what its reports carry)."""
        keys = param_keys(self.affine, self.use_scale, self.use_bias, "bnjax.linen.BatchNorm")
        return flax_module_config(
            self,
            affine=bool(keys),
            bias="bias" in keys,
            track_running_stats=self.track_running_stats,
        )

    def _collection(
        self,
        col: str,
        names: Sequence[str],
        create: Callable[[str, tuple[int, ...]], Array] | None,
        features: tuple[int, ...],
    ) -> dict[str, Array]:
        """This module's `col` variables, created when missing and `col` is mutable.

        Variables that already exist keep their stored shape (so a feature-size
        mismatch reaches `bnjax.apply`'s error naming both sizes), and a collection
        holding other names (e.g. Flax's `scale`, `mean`, `var`) is rejected.
        """
        present = dict(self.variables.get(col, {}))
        if present and set(present) != set(names):
            try:
                check_keys(col, present, names)
            except ValueError as e:
                hint = ""
                if {"scale", "mean", "var"} & set(present):
                    hint = (
                        " These are flax.linen.BatchNorm's names: convert the variables "
                        "with `bnjax.flax_interop.variables_from_flax`."
                    )
                else:
                    hint = (
                        f" This module has affine={self.affine}, use_scale={self.use_scale}, "
                        f"use_bias={self.use_bias}, "
                        f"track_running_stats={self.track_running_stats}."
                    )
                raise ValueError(
                    f"bnjax.linen.BatchNorm at '{self._path()}': the '{col}' collection has "
                    f"the wrong variables. {e}{hint}"
                ) from None
        tree = {}
        for name in names:
            if name in present:
                stored = meta.unbox(present[name])
                shape = tuple(np.shape(stored))
            elif self.is_mutable_collection(col) or self.is_initializing():
                shape = features if name != "num_batches_tracked" else ()
            else:
                raise ValueError(
                    f"bnjax.linen.BatchNorm at '{self._path()}': no '{name}' in the '{col}' "
                    f"collection (found {sorted(present)}; this module's collections: "
                    f"{sorted(self.variables)}). Pass the variables returned by `model.init`"
                    + (", including 'batch_stats'." if col == "batch_stats" else ".")
                )
            if name == "num_batches_tracked":
                shape = features  # the creator ignores it; the stored scalar is kept
            assert create is not None
            tree[name] = create(name, shape)
        return tree

    def _path(self) -> str:
        return "/" + "/".join(str(p) for p in self.scope.path) if self.scope else "?"


def _is_bound(axis_name: Any) -> bool:
    """Whether `axis_name` (a name or a tuple of names) is bound where we trace."""
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        return False
    return True
