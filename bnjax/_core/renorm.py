r"""Batch Renormalization (Ioffe, 2017): its settings, its statistics, its correction.

Batch Renormalization normalizes with the batch statistics, as BatchNorm does, then
corrects the result towards what the moving statistics would give:

$$y = \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) \gamma + \beta,\qquad
  r = \mathrm{clip}\!\left(\frac{\sigma_B}{\sigma}, r_{min}, r_{max}\right),\quad
  d = \mathrm{clip}\!\left(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\right)$$

with `r` and `d` held constant in the backward pass (`stop_gradient`), so the
gradient is BatchNorm's with the scale `r * gamma`. `sigma_B = sqrt(var_B + eps)`
(biased batch variance, as the normalization uses it), and `mu`, `sigma` are the
layer's *renorm statistics* `renorm_mean`, `renorm_std`: moving averages of `mu_B`
and `sigma_B` with their own momentum, kept beside (not instead of) PyTorch's
`running_mean` / `running_var`, which are updated exactly as without renorm and are
what eval mode uses. That is Keras's `BatchNormalization(renorm=True)` (Keras calls
them `renorm_mean` / `renorm_stddev`), with PyTorch's momentum convention.

With `rmax=1, dmax=0` the correction is `r = 1, d = 0`: exactly BatchNorm.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._core.conventions import RENORM_KEYS
from bnjax._core.stats import Moments

Array = jax.Array
#: A clipping bound: a number, an array (a value passed each step; traced values are
#: not checked), or a schedule `step -> value` of the layer's `num_batches_tracked`.
Bound = float | Array | Callable[[Array], Any] | None


class Renorm(NamedTuple):
    r"""Batch Renormalization's settings, for `bnjax.apply(..., renorm=...)`.

    Each bound may be a Python number, a JAX scalar (a value the caller passes each
    step, e.g. as an argument of a jitted step), or a schedule: a function of the
    step, called with the layer's `num_batches_tracked` before this update (an
    `optax` schedule such as `optax.linear_schedule(1.0, 3.0, 20_000, 5_000)` ramps
    `rmax` from 1 to 3 as the paper does). `None` leaves that side unclipped
    (Keras's behaviour for a key missing from `renorm_clipping`).

    The defaults are the paper's final bounds (rmax 3, dmax 5, rmin 1/3). Keras's
    `BatchNormalization(renorm=True)` clips nothing unless `renorm_clipping` says so:
    `Renorm.keras(...)` gives Keras's behaviour exactly.

    Attributes:
      rmax: upper bound of `r`, >= 1 (the paper ramps it from 1 to 3).
      dmax: bound of `|d|`, >= 0 (the paper ramps it from 0 to 5).
      momentum: PyTorch-style momentum of the renorm statistics, the weight of the
        new batch (Keras's `renorm_momentum=0.99` is `0.01`), in [0, 1].
      rmin: lower bound of `r`; `None` (default) means `1 / rmax` (the paper's
        clipping); pass `0.0` for no lower bound.

    Example:
      >>> renorm = bnjax.Renorm(rmax=3.0, dmax=5.0)
      >>> params, batch_stats = bnjax.init(2, renorm=True)
      >>> [k for k in batch_stats if k.startswith("renorm")]
      ['renorm_mean', 'renorm_std']
      >>> x = jnp.array([[0.0, 1.0], [2.0, 5.0]])
      >>> y, batch_stats = bnjax.apply(params, batch_stats, x, train=True, renorm=renorm)
      >>> batch_stats["renorm_mean"]        # 0.99 * 0 + 0.01 * [1, 3]
      Array([0.01, 0.03], dtype=float32)
    """

    rmax: Bound = 3.0
    dmax: Bound = 5.0
    momentum: float = 0.01
    rmin: Bound = None

    @classmethod
    def keras(
        cls, renorm_clipping: Mapping[str, Any] | None = None, renorm_momentum: float = 0.99
    ) -> Renorm:
        """Keras's `BatchNormalization(renorm=True, ...)`, exactly: no clipping by default.

        Keras clips only what `renorm_clipping` names: a missing `rmax`, `rmin` or
        `dmax` leaves that side unclipped (a missing `rmin` is 0, not `1 / rmax` as in
        `Renorm()`, which clips at the paper's 3 and 5). `renorm_momentum` is Keras's
        (the weight of the old value); bnjax's momentum is `1 - renorm_momentum`.
        The layer's own settings convert the same way: Keras's defaults
        `momentum=0.99, epsilon=1e-3` are bnjax's `momentum=0.01, eps=1e-3`
        (docs/accumulation.md, "Keras's conventions").

        Args:
          renorm_clipping: Keras's dict with any of the keys `rmax`, `rmin`, `dmax`,
            or None (Keras's default: no clipping).
          renorm_momentum: Keras's renorm momentum, in [0, 1] (default 0.99).

        Returns:
          The `Renorm` that computes what Keras computes.

        Raises:
          ValueError: a key other than `rmax`, `rmin`, `dmax`, or a momentum outside
            [0, 1].

        Example:
          >>> bnjax.Renorm.keras()
          Renorm(rmax=None, dmax=None, momentum=0.01, rmin=None)
          >>> bnjax.Renorm.keras({"rmax": 3.0, "dmax": 5.0})
          Renorm(rmax=3.0, dmax=5.0, momentum=0.01, rmin=0.0)
        """
        clip = dict(renorm_clipping or {})
        unknown = sorted(set(clip) - {"rmax", "rmin", "dmax"})
        if unknown:
            raise ValueError(
                f"bnjax.Renorm.keras: renorm_clipping takes the keys 'rmax', 'rmin' and "
                f"'dmax' (Keras's), got {unknown}."
            )
        m = renorm_momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= m <= 1:
            raise ValueError(
                "bnjax.Renorm.keras: renorm_momentum is Keras's (the weight of the old "
                f"value), a number in [0, 1]; got {m!r}."
            )
        rmax = clip.get("rmax")
        # Keras: a missing rmin is no lower bound; bnjax's None would mean 1 / rmax.
        rmin = clip.get("rmin", 0.0 if rmax is not None else None)
        return cls(rmax=rmax, dmax=clip.get("dmax"), momentum=round(1 - m, 12), rmin=rmin)


def check_renorm(renorm: Any, who: str = "bnjax.apply") -> Renorm | None:
    """`renorm` is None or a `Renorm` whose static bounds make sense (trace time)."""
    if renorm is None:
        return None
    if not isinstance(renorm, Renorm):
        raise TypeError(
            f"{who}: `renorm` must be a `bnjax.Renorm(rmax=..., dmax=..., momentum=...)` or "
            f"None, got {type(renorm).__name__} {renorm!r}."
        )
    m = renorm.momentum
    if isinstance(m, jax.core.Tracer) or not isinstance(m, numbers.Real) or isinstance(m, bool):
        raise TypeError(
            f"{who}: `Renorm.momentum` must be a static Python number in [0, 1], got {m!r}."
        )
    if not 0 <= m <= 1:
        raise ValueError(
            f"{who}: `Renorm.momentum` must be in [0, 1] (PyTorch's convention, the weight of "
            f"the new batch; Keras's renorm_momentum=0.99 is 0.01), got {m!r}."
        )
    rmax, dmax, rmin = (_static(v) for v in (renorm.rmax, renorm.dmax, renorm.rmin))
    if rmax is not None and not rmax >= 1:
        raise ValueError(
            f"{who}: `Renorm.rmax` must be >= 1 (r is clipped to [1/rmax, rmax]; rmax=1 is "
            f"plain BatchNorm), got rmax={rmax!r}."
        )
    if dmax is not None and not dmax >= 0:
        raise ValueError(
            f"{who}: `Renorm.dmax` must be >= 0 (d is clipped to [-dmax, dmax]; dmax=0 is "
            f"plain BatchNorm), got dmax={dmax!r}."
        )
    if rmin is not None and not rmin >= 0:
        raise ValueError(f"{who}: `Renorm.rmin` must be >= 0 (or None: 1/rmax), got {rmin!r}.")
    if rmin is not None and rmax is not None and rmin > rmax:
        raise ValueError(
            f"{who}: `Renorm.rmin` ({rmin!r}) must not exceed `Renorm.rmax` ({rmax!r})."
        )
    return renorm


#: What a report's config holds in place of a bound passed as an array (a value that
#: changes every step cannot be static pytree aux data, and tools never read bounds).
DYNAMIC = "<passed each call>"


def static_settings(renorm: Renorm | None) -> Renorm | None:
    """`renorm` with array-valued bounds replaced by `DYNAMIC`: hashable, for reports."""
    if renorm is None:
        return None
    return renorm._replace(
        **{
            f: DYNAMIC
            for f in ("rmax", "dmax", "rmin")
            if isinstance(getattr(renorm, f), (jax.Array, np.ndarray, np.generic))
        }
    )


def _static(v: Any) -> float | None:
    """The Python value of a bound when it is known at trace time, else None."""
    if v is None or callable(v) or isinstance(v, (jax.core.Tracer, str)):
        return None
    if isinstance(v, bool):
        raise TypeError(f"bnjax: a Renorm bound must be a number, got {v!r}.")
    try:
        return float(v)
    except TypeError:
        return None


def init_stats(shape: tuple[int, ...], dtype: Any = jnp.float32) -> dict[str, Array]:
    """The renorm statistics at the start: mean 0, std 1 (Keras's initial values)."""
    return {
        "renorm_mean": jnp.zeros(shape, dtype),
        "renorm_std": jnp.ones(shape, dtype),
    }


def check_stats_keys(batch_stats: Any, renorm: Renorm | None, who: str = "bnjax.apply") -> None:
    """Renorm statistics are present exactly when `renorm` is given (and stats are kept)."""
    if not isinstance(batch_stats, Mapping) or not batch_stats:
        return
    has = [k for k in RENORM_KEYS if k in batch_stats]
    if renorm is None and has:
        raise ValueError(
            f"{who}: `batch_stats` holds Batch Renormalization statistics {has}, but no "
            "`renorm=` was given. Pass the layer's `renorm=bnjax.Renorm(...)` (also in eval "
            "mode), or drop those keys for a plain BatchNorm."
        )
    if renorm is not None and len(has) != len(RENORM_KEYS):
        raise ValueError(
            f"{who}: `renorm=` needs `batch_stats` with the keys {list(RENORM_KEYS)} beside "
            f"the running statistics; found {sorted(batch_stats)}. Create them with "
            "`bnjax.init(num_features, renorm=True)`."
        )


def check_stats_shapes(batch_stats: Mapping[str, Any], features: tuple[int, ...]) -> None:
    """Renorm statistics, where present, have the features' shape."""
    for k in RENORM_KEYS:
        if k in batch_stats and tuple(np.shape(batch_stats[k])) != features:
            raise ValueError(
                f"bnjax.apply: batch_stats['{k}'] has shape {tuple(np.shape(batch_stats[k]))} "
                f"but x has features of shape {features}; create the renorm statistics with "
                "`bnjax.init(num_features, renorm=True)`."
            )


def split_stats(batch_stats: Mapping[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
    """`batch_stats` as (the running statistics, the renorm statistics)."""
    base = {k: v for k, v in batch_stats.items() if k not in RENORM_KEYS}
    extra = {k: batch_stats[k] for k in RENORM_KEYS if k in batch_stats}
    return base, extra


def _bound(v: Bound, step: Array) -> Array | None:
    if v is None:
        return None
    if isinstance(v, str):
        raise TypeError(
            f"bnjax: a Renorm bound must be a number, an array or a schedule, got {v!r}."
        )
    if callable(v):
        v = v(step)
    return jnp.asarray(v, jnp.float32)


def correction(
    moments: Moments,
    renorm_stats: Mapping[str, Array],
    step: Array,
    renorm: Renorm,
    eps: float,
) -> tuple[Array, Array]:
    """`(r, d)`, per feature, held constant for autodiff (Keras's exact formula).

    `r = clip(sigma_B / max(renorm_std, sqrt(eps)), rmin, rmax)` and
    `d = clip((mu_B - renorm_mean) / max(renorm_std, sqrt(eps)), -dmax, dmax)`.
    """
    dtype = moments.mean.dtype
    mean, var = lax.stop_gradient((moments.mean, moments.var))
    sigma_b = jnp.sqrt(var + jnp.asarray(eps, dtype))
    sigma = jnp.maximum(renorm_stats["renorm_std"].astype(dtype), jnp.sqrt(jnp.asarray(eps, dtype)))
    r = sigma_b / sigma
    d = (mean - renorm_stats["renorm_mean"].astype(dtype)) / sigma
    rmax, dmax = _bound(renorm.rmax, step), _bound(renorm.dmax, step)
    rmin = _bound(renorm.rmin, step)
    if rmin is None and rmax is not None:
        rmin = 1.0 / rmax
    if rmin is not None:
        r = jnp.maximum(r, rmin.astype(dtype))
    if rmax is not None:
        r = jnp.minimum(r, rmax.astype(dtype))
    if dmax is not None:
        d = jnp.clip(d, -dmax.astype(dtype), dmax.astype(dtype))
    return lax.stop_gradient(r), lax.stop_gradient(d)


def corrected_params(
    weight: Array | None, bias: Array | None, r: Array, d: Array
) -> dict[str, Array]:
    """BatchNorm params that apply the correction: `(x_hat r + d) w + b`.

    `weight' = r * w` and `bias' = d * w + b`; with `r = 1, d = 0` they are `w` and
    `b` bit for bit, so the same BatchNorm kernel gives the same numbers.
    """
    if weight is None:
        return {"weight": r, "bias": d if bias is None else d + bias.astype(d.dtype)}
    w = weight.astype(r.dtype)
    new_w = (r * w).astype(weight.dtype)
    shift = d * w
    new_b = shift if bias is None else shift + bias.astype(r.dtype)
    return {"weight": new_w, "bias": new_b.astype(weight.dtype if bias is None else bias.dtype)}


def update_stats(
    renorm_stats: Mapping[str, Array], moments: Moments, renorm: Renorm, eps: float
) -> dict[str, Array]:
    """Moves the renorm statistics towards the batch's `mu_B` and `sigma_B`.

    `renorm_mean = (1 - m) renorm_mean + m mu_B`, `renorm_std = (1 - m) renorm_std +
    m sqrt(var_B + eps)` (biased `var_B`), `m = renorm.momentum`. Kept when fewer
    than 2 values counted, as the running statistics are.
    """
    rm, rs = renorm_stats["renorm_mean"], renorm_stats["renorm_std"]
    dtype = jnp.promote_types(rm.dtype, jnp.float32)
    m = jnp.asarray(renorm.momentum, dtype)
    mean = lax.stop_gradient(moments.mean).astype(dtype)
    var = lax.stop_gradient(moments.var).astype(dtype)
    new_rm = (1 - m) * rm.astype(dtype) + m * mean
    new_rs = (1 - m) * rs.astype(dtype) + m * jnp.sqrt(var + jnp.asarray(eps, dtype))
    n = moments.count
    if not (isinstance(n, int) and n >= 2):
        keep = n < 2
        new_rm = jnp.where(keep, rm.astype(dtype), new_rm)
        new_rs = jnp.where(keep, rs.astype(dtype), new_rs)
    return {"renorm_mean": new_rm.astype(rm.dtype), "renorm_std": new_rs.astype(rs.dtype)}
