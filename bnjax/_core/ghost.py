"""Ghost batches (`virtual_batch_size`): statistics per fixed-size sub-batch.

With `virtual_batch_size=V`, the batch axis (axis 0) of `x`, of size `N = G * V`, is
cut into `G` contiguous sub-batches ("ghost batches") of `V` examples, rows
`[g * V, (g + 1) * V)`, the order `split_micro_batches` and `x.split(V)` use; each
is normalized with its own statistics, as if it were a batch of its own. It is
`jax.vmap` of the plain BatchNorm over the ghosts, so masks, the fused kernel and
every transform work unchanged.

The running statistics are updated once per call, as Keras does: with the mean over
the ghosts of their means and of their variances (each ghost's *unbiased* variance
here, PyTorch's convention; Keras averages the biased ones). Under `axis_name`, each
device's ghosts are its own and the averages run over every device's ghosts, so the
numbers equal one device holding the whole batch. With a `mask`, ghosts are weighted
by the values they count, and n is the mean count per ghost.

Keras cuts the batch differently: its ghost `g` is the *strided* rows
`g, g + G, g + 2G, ...` (it reshapes to `(V, G, ...)`). `x[perm]` with
`perm = arange(N).reshape(V, G).T.ravel()` turns one layout into the other.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._core.stats import Moments

Array = jax.Array


def check_virtual_batch_size(
    virtual_batch_size: Any, x_shape: tuple[int, ...] | None, axes: tuple[int, ...], who: str
) -> int | None:
    """A positive int dividing the batch axis 0, which must not be a feature axis.

    With `x_shape=None` only the value is checked (a layer's configuration).
    """
    vbs = virtual_batch_size
    if vbs is None:
        return None
    if isinstance(vbs, bool) or not isinstance(vbs, numbers.Integral) or vbs <= 0:
        raise ValueError(
            f"{who}: `virtual_batch_size` must be a positive int (the size of each ghost "
            f"batch) or None, got {vbs!r}."
        )
    vbs = int(vbs)
    if x_shape is None:
        return vbs
    if not x_shape or 0 in axes:
        raise ValueError(
            f"{who}: `virtual_batch_size` cuts the batch axis 0 into ghost batches, but x "
            f"of shape {tuple(x_shape)} has feature axis {axes}. Put the batch first "
            "(channels-last `axis=-1` or NCHW `axis=1`)."
        )
    n = x_shape[0]
    if n % vbs:
        raise ValueError(
            f"{who}: the batch axis of x (shape {tuple(x_shape)}, batch {n}) is not divisible "
            f"by virtual_batch_size={vbs}. Use a batch that is a multiple of {vbs} (e.g. "
            f"{(n // vbs + 1) * vbs}), or a virtual_batch_size that divides {n}."
        )
    return vbs


def split(x: Array, mask: Array | None, vbs: int) -> tuple[Array, Array | None]:
    """`x` (and `mask`) with the batch axis cut into `(G, V)`: ghost g is rows g*V.."""
    g = x.shape[0] // vbs
    xg = x.reshape((g, vbs) + x.shape[1:])
    mg = None if mask is None else mask.reshape((g, vbs) + mask.shape[1:])
    return xg, mg


def pool(moments: Moments, *, axis_name: Any = None, axis_index_groups: Any = None) -> Moments:
    """One `Moments` for the running statistics from the ghosts' (leading axis G).

    Static counts (no mask): the plain mean over the ghosts (and devices) of the
    means and biased variances, n the values per ghost. Traced counts (a mask):
    count-weighted means, n the mean count per ghost.
    """
    g = moments.mean.shape[0]
    count = moments.count
    if isinstance(count, int):
        mean, var = jnp.mean(moments.mean, axis=0), jnp.mean(moments.var, axis=0)
        if axis_name is not None:
            mean, var = lax.pmean((mean, var), axis_name, axis_index_groups=axis_index_groups)
        return Moments(mean=mean, var=var, count=count)
    n = jnp.asarray(count, jnp.int32)  # (G,)
    w = n.astype(moments.mean.dtype).reshape((g,) + (1,) * (moments.mean.ndim - 1))
    sums = (jnp.sum(w * moments.mean, axis=0), jnp.sum(w * moments.var, axis=0))
    total, ghosts = jnp.sum(n), jnp.asarray(g, jnp.int32)
    if axis_name is not None:
        sums, total, ghosts = lax.psum(
            (sums, total, ghosts), axis_name, axis_index_groups=axis_index_groups
        )
    denom = jnp.maximum(total, 1).astype(moments.mean.dtype)
    return Moments(mean=sums[0] / denom, var=sums[1] / denom, count=total // ghosts)
