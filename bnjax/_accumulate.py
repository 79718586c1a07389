"""How running statistics treat micro-batches: the maths behind `bnjax.training`.

The training step runs an opaque `loss_fn`; this module finds, at trace time, which
leaves of the `batch_stats` it returns were written by `bnjax.apply` (and with which
momentum and count), and combines the per-micro-batch results into the policies
"corrected" and "full". Nothing here changes what `bnjax.apply` computes.

Every BatchNorm update is affine in the batch moments (SPEC):
`out = (1 - m) * s + m * b`, b the batch mean or unbiased batch variance. So:

- "corrected": with the statistics `c` the layer was given and its output `out`,
  `c + (m_k / m) * (out - c)` is the update with momentum `m_k` instead of `m`.
- "full": every micro-batch starts from the step's initial statistics `s0`; with
  `a_i = out_mean_i`, `c_i = out_var_i - (1 - m) s0_var` and n_i values per feature,
  the pooled big-batch update is (weights w_i = n_i / N, N = sum n_i)

      running_mean = sum_i w_i a_i
      running_var  = (1 - m) s0_var
                     + [sum_i (n_i - 1) c_i + sum_i n_i (a_i - mean_a)^2 / m] / (N - 1)

  which is `(1 - m) s0 + m * (pooled mean, unbiased pooled variance)` written
  without dividing the small per-batch terms by m. The sums are streamed with
  Chan's pairwise update, so the scan carries O(number of features) values.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import _core

Array = jax.Array


class _Record(NamedTuple):
    """One `bnjax.apply` running-statistics update seen while tracing `loss_fn`."""

    in_ids: tuple[int, int, int]  # ids of the input mean, var, count leaves
    out_ids: tuple[int, int, int]  # ids of the output mean, var, count leaves
    momentum: float | None
    count: Any  # values per feature: an int when static, else a traced int32 scalar


class Layer(NamedTuple):
    """A BatchNorm layer's leaves in the flattened `batch_stats`, and its settings."""

    mean: int  # leaf index of running_mean
    var: int  # leaf index of running_var
    nbt: int  # leaf index of num_batches_tracked
    momentum: float | None  # static, None for a cumulative average


@contextlib.contextmanager
def observe_updates() -> Iterator[list[_Record]]:
    """Records every running-statistics update `bnjax.apply` traces inside the block."""
    records: list[_Record] = []

    def observer(batch_stats, new_batch_stats, moments, momentum):
        keys = ("running_mean", "running_var", "num_batches_tracked")
        records.append(
            _Record(
                in_ids=tuple(id(batch_stats[k]) for k in keys),
                out_ids=tuple(id(new_batch_stats[k]) for k in keys),
                momentum=momentum,
                count=moments.count,
            )
        )

    token = _core._UPDATE_OBSERVER.set(observer)
    try:
        yield records
    finally:
        _core._UPDATE_OBSERVER.reset(token)


def match_layers(
    records: list[_Record], given_leaves: list[Any], policy: str
) -> tuple[list[Layer], list[Any]]:
    """Maps recorded updates to leaf indices of `batch_stats`, by the leaves they read.

    A layer that read the leaves at indices (i, j, l) of the `batch_stats` the step
    passed to `loss_fn` must return its new statistics at the same indices (the same
    paths), which every model that threads statistics does. Returns the layers
    (static) and their counts (ints or traced scalars).

    Raises:
      ValueError: an update read statistics that are not leaves the step passed in
        (copied or cast ones, or a layer updated twice in one micro-batch).
    """
    index = {id(leaf): i for i, leaf in enumerate(given_leaves)}
    out_ids = {i for r in records for i in r.out_ids}
    layers, counts = [], []
    for r in records:
        try:
            mean, var, nbt = (index[i] for i in r.in_ids)
        except KeyError:
            if r.in_ids[0] in out_ids:
                raise ValueError(
                    f"bnjax.training: stats_policy={policy!r} needs each BatchNorm's "
                    "statistics to be updated once per micro-batch, but loss_fn updates one "
                    "layer's statistics twice (a shared layer called twice in training "
                    "mode). Use stats_policy='micro', or give each call its own statistics."
                ) from None
            raise ValueError(
                f"bnjax.training: stats_policy={policy!r} needs each BatchNorm in loss_fn "
                "to read its statistics straight from the batch_stats the step passes in "
                f"(indexing is fine), but {len(records)} BatchNorm update(s) were traced and "
                "one read other arrays (copied, cast, or inside a `jax.vmap`, "
                "`jax.checkpoint` or `lax.scan` within loss_fn; wrap the step instead). "
                "Use stats_policy='micro' for such a model."
            ) from None
        layers.append(Layer(mean, var, nbt, r.momentum))
        counts.append(r.count)
    return layers, counts


def corrected_momentum(momentum: float, accum_steps: int) -> float:
    """m_k = 1 - (1 - m)^(1/k), computed without cancellation."""
    if momentum >= 1:
        return 1.0
    return -math.expm1(math.log1p(-momentum) / accum_steps)


def check_corrected(layers: list[Layer]) -> None:
    for layer in layers:
        if layer.momentum is None:
            raise ValueError(
                "bnjax.training: stats_policy='corrected' needs a fixed momentum, but a "
                "BatchNorm uses momentum=None (a cumulative average, which already weighs "
                "every micro-batch equally). Use stats_policy='micro' or 'full'."
            )


def corrected_update(
    given: list[Array], out: list[Array], layers: list[Layer], accum_steps: int
) -> list[Array]:
    """Rescales each recorded update from momentum m to m_k = 1 - (1 - m)^(1/k)."""
    new = list(out)
    for layer in layers:
        m = layer.momentum
        assert m is not None  # check_corrected
        ratio = corrected_momentum(m, accum_steps) / m if m > 0 else 0.0
        for i in (layer.mean, layer.var):
            c = given[i]
            dtype = jnp.promote_types(c.dtype, jnp.float32)
            c32, o32 = c.astype(dtype), out[i].astype(dtype)
            new[i] = (c32 + jnp.asarray(ratio, dtype) * (o32 - c32)).astype(c.dtype)
    return new


class PoolState(NamedTuple):
    """Streaming sums of the "full" policy, one entry per layer."""

    n: list[Array]  # () float32: values per feature counted so far
    a: list[Array]  # features' shape: count-weighted mean of the output means
    q: list[Array]  # features' shape: sum_i n_i (a_i - mean a)^2 (Chan)
    c: list[Array]  # features' shape: sum_i (n_i - 1) (out_var_i - (1 - m) s0_var)


def _layer_momentum(layer: Layer, s0: list[Array], dtype: Any) -> Array:
    """The momentum the core used from `s0` (1 / (count + 1) for momentum=None)."""
    if layer.momentum is None:
        return 1.0 / (s0[layer.nbt] + 1).astype(dtype)
    return jnp.asarray(layer.momentum, dtype)


def pool_init(s0: list[Array], layers: list[Layer]) -> PoolState:
    def zeros(layer: Layer) -> Array:
        return jnp.zeros(s0[layer.mean].shape, jnp.promote_types(s0[layer.mean].dtype, "f4"))

    return PoolState(
        n=[jnp.zeros((), jnp.float32) for _ in layers],
        a=[zeros(layer) for layer in layers],
        q=[zeros(layer) for layer in layers],
        c=[zeros(layer) for layer in layers],
    )


def pool_add(
    state: PoolState, s0: list[Array], out: list[Array], layers: list[Layer], counts: list[Any]
) -> PoolState:
    """Adds one micro-batch (run from `s0`) to the streaming sums."""
    ns, as_, qs, cs = [], [], [], []
    for j, layer in enumerate(layers):
        dtype = state.a[j].dtype
        n_i = jnp.asarray(counts[j], jnp.float32)
        # The core leaves the statistics unchanged below 2 values: nothing to pool.
        n_i = jnp.where(n_i >= 2, n_i, 0.0)
        m = _layer_momentum(layer, s0, dtype)
        a_i = out[layer.mean].astype(dtype)
        c_i = out[layer.var].astype(dtype) - (1 - m) * s0[layer.var].astype(dtype)
        n_new = state.n[j] + n_i
        w = jnp.where(n_new > 0, n_i / jnp.maximum(n_new, 1.0), 0.0).astype(dtype)
        delta = a_i - state.a[j]
        ns.append(n_new)
        as_.append(state.a[j] + w * delta)
        qs.append(state.q[j] + (state.n[j] * w).astype(dtype) * delta * delta)
        cs.append(state.c[j] + (jnp.maximum(n_i - 1, 0.0)).astype(dtype) * c_i)
    return PoolState(ns, as_, qs, cs)


def pool_finish(state: PoolState, s0: list[Array], layers: list[Layer]) -> list[Array]:
    """The statistics one big-batch update would record, from the streamed sums."""
    new = list(s0)
    for j, layer in enumerate(layers):
        rm, rv, nbt = s0[layer.mean], s0[layer.var], s0[layer.nbt]
        dtype = state.a[j].dtype
        n = state.n[j]
        new[layer.nbt] = nbt + jnp.ones((), nbt.dtype)
        if layer.momentum == 0:
            continue  # momentum 0: the statistics never move.
        m = _layer_momentum(layer, s0, dtype)
        new_mean = jnp.where(n > 0, state.a[j], rm.astype(dtype))
        pooled = (state.c[j] + state.q[j] / m) / jnp.maximum(n - 1, 1.0).astype(dtype)
        new_var = jnp.where(n >= 2, (1 - m) * rv.astype(dtype) + pooled, rv.astype(dtype))
        new[layer.mean] = new_mean.astype(rm.dtype)
        new[layer.var] = new_var.astype(rv.dtype)
    return new
