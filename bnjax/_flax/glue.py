"""What `bnjax.linen.BatchNorm` and `bnjax.nnx.BatchNorm` share: their config, keys and mode."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bnjax._core.config import BatchNormConfig
from bnjax._core.conventions import PARAM_KEYS
from bnjax._core.validate import check_train


def stats_dtype_of(param_dtype: Any, stats_dtype: Any = None) -> np.dtype:
    """The running statistics' dtype of a Flax BatchNorm module.

    `stats_dtype` when given; otherwise the wider of `param_dtype` and float32: float64
    parameters get float64 statistics (a float64 model is float64 end to end), and
    float32, bfloat16 or float16 parameters keep float32 statistics.

    Args:
      param_dtype: the module's `param_dtype`.
      stats_dtype: the module's `stats_dtype` option (None: follow `param_dtype`).

    Returns:
      A NumPy dtype (canonical: float32 where JAX's float64 is off).

    Example:
      >>> str(stats_dtype_of(jnp.bfloat16)), str(stats_dtype_of(jnp.float32, jnp.bfloat16))
      ('float32', 'bfloat16')
    """
    dtype = (
        stats_dtype if stats_dtype is not None else jax.numpy.promote_types(param_dtype, np.float32)
    )
    return jax.dtypes.canonicalize_dtype(dtype)


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
        renorm=getattr(module, "renorm", None),
        virtual_batch_size=getattr(module, "virtual_batch_size", None),
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
