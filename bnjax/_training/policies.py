"""How running statistics treat micro-batches: small pure strategies, optax style.

A `StatsPolicy` is a NamedTuple of three pure functions that `make_train_step`
calls around its `lax.scan` over k micro-batches; it never branches on the policy:

    state = policy.init(batch_stats, k)                          # before the scan
    stats, state = policy.update(state, stats_in, stats_out, reports, k)  # each micro-batch
    batch_stats = policy.finish(state, batch_stats, stats, stacked_reports, k)  # after

`stats_in` is what the micro-batch's `loss_fn` was given, `stats_out` what it
returned, `reports` the `BatchNormReport`s it returned (aligned with the statistics'
paths; see `bnjax.collect_reports`), and `stacked_reports` all k micro-batches'
reports, stacked on a leading axis. Every statistics tree here is nested plain
dicts. Each BatchNorm's momentum and count come from its report (moments + config).

- `micro()`: keep what `loss_fn` returned (k updates with the layer's momentum m,
  PyTorch's accumulation loop). Needs no reports.
- `corrected()`: each micro-batch updates with m_k = 1 - (1 - m)^(1/k), so old
  statistics decay by 1 - m per optimizer step whatever k is.
- `full()`: pool the k micro-batches' moments (Chan et al.) and apply one update
  with each layer's m, as one big batch of all k micro-batches would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax.numpy as jnp

from bnjax._core import functional as _core
from bnjax._core.conventions import check_unit_interval
from bnjax._core.report import BatchNormReport
from bnjax._core.stats import Moments
from bnjax._model import tree
from bnjax._model.tree import path_name

PyTree = Any
Path = tuple[Any, ...]


class StatsPolicy(NamedTuple):
    """How the running statistics treat k micro-batches: three pure functions.

    Attributes:
      init: `init(batch_stats, accum_steps) -> state` (any pytree of arrays, or None).
      update: `update(state, stats_in, stats_out, reports, accum_steps) ->
        (stats_next, state)`, once per micro-batch inside the scan; `reports` is
        None when `loss_fn` returns none.
      finish: `finish(state, batch_stats, stats_last, stacked_reports, accum_steps)
        -> new_batch_stats`, once after the scan.
      needs_reports: whether `loss_fn` must return each BatchNorm's report.
    """

    init: Callable[[PyTree, int], Any]
    update: Callable[[Any, PyTree, PyTree, PyTree, int], tuple[PyTree, Any]]
    finish: Callable[[Any, PyTree, PyTree, PyTree, int], PyTree]
    needs_reports: bool


def micro() -> StatsPolicy:
    """Each micro-batch updates the statistics with the layer's own momentum m.

    PyTorch's accumulation loop (the model called k times per `optimizer.step()`):
    the statistics are what `loss_fn` returns, `num_batches_tracked += k`.

    Returns:
      A `StatsPolicy` that needs no reports.

    Example:
      >>> bnjax.training.micro().needs_reports
      False
    """

    def update(state, stats_in, stats_out, reports, accum_steps):
        del stats_in, reports, accum_steps
        return stats_out, state

    return StatsPolicy(_no_state, update, _last_stats, needs_reports=False)


def corrected() -> StatsPolicy:
    r"""Each micro-batch updates with $m_k = 1 - (1 - m)^{1/k}$: decay as one step would.

    Old statistics decay by exactly `1 - m` per optimizer step whatever k is, since
    `(1 - m_k)^k = 1 - m`. `num_batches_tracked += k`. Needs a fixed momentum.

    Returns:
      A `StatsPolicy` that needs each BatchNorm's report.

    Example:
      >>> bnjax.training.corrected().needs_reports
      True
    """

    def update(state, stats_in, stats_out, reports, accum_steps):
        layers = trained_layers(stats_in, reports, "corrected")
        new = {}
        for path, report in layers:
            m = report.config.momentum
            if m is None:
                raise ValueError(
                    "bnjax.training: stats_policy='corrected' needs a fixed momentum, but the "
                    f"BatchNorm at '{path_name(path)}' uses momentum=None (a cumulative average, "
                    "which already weighs every micro-batch equally). Use "
                    "stats_policy='micro' or 'full'."
                )
            mk = corrected_momentum(m, accum_steps)
            renorm = report.config.renorm  # Batch Renormalization's statistics: corrected too
            if renorm is not None:
                renorm = renorm._replace(momentum=corrected_momentum(renorm.momentum, accum_steps))
            new[path] = _core.update_stats(
                tree.get(stats_in, path),
                report.moments,
                momentum=mk,
                renorm=renorm,
                eps=report.config.eps,
            )
        return tree.replace(stats_out, new), state

    return StatsPolicy(_no_state, update, _last_stats, needs_reports=True)


def full() -> StatsPolicy:
    """One update per step from the moments of all k micro-batches pooled together.

    Each micro-batch still normalizes with its own statistics; the running
    statistics see the pooled mean and unbiased pooled variance of all k*B values
    (Chan et al.'s combination of (count, mean, biased var) per micro-batch; those
    with fewer than 2 values are left out, as `bnjax.apply` leaves them out),
    applied once with each layer's momentum: `num_batches_tracked += 1`.

    Returns:
      A `StatsPolicy` that needs each BatchNorm's report.

    Example:
      >>> bnjax.training.full().needs_reports
      True
    """

    def update(state, stats_in, stats_out, reports, accum_steps):
        del accum_steps
        layers = trained_layers(stats_in, reports, "full")
        # Moved once, in finish.
        return tree.replace(
            stats_out, {path: tree.get(stats_in, path) for path, _ in layers}
        ), state

    def finish(state, batch_stats, stats_last, reports, accum_steps):
        del state, accum_steps
        new = {}
        for path, stacked in trained_layers(batch_stats, reports, "full", stacked=True):
            new[path] = _core.update_stats(
                tree.get(batch_stats, path),
                pool_moments(stacked.moments),
                momentum=stacked.config.momentum,
                renorm=stacked.config.renorm,
                eps=stacked.config.eps,
            )
        return tree.replace(stats_last, new)

    return StatsPolicy(_no_state, update, finish, needs_reports=True)


def _no_state(batch_stats: PyTree, accum_steps: int) -> None:
    """`init` of a policy that keeps no state across micro-batches."""
    del batch_stats, accum_steps


def _last_stats(
    state: Any, batch_stats: PyTree, stats_last: PyTree, reports: PyTree, accum_steps: int
) -> PyTree:
    """`finish` of a policy whose scan already produced the final statistics."""
    del state, batch_stats, reports, accum_steps
    return stats_last


def pool_moments(moments: Moments) -> Moments:
    """Pools moments stacked on a leading axis into the moments of all values together.

    Entries with fewer than 2 values are left out (the core would leave the running
    statistics unchanged for them). Reduced in float32 at least.

    Args:
      moments: a `Moments` whose mean and var have a leading axis of size k (count
        has it too).

    Returns:
      The pooled `Moments`: count-weighted mean, biased variance of the union
      (within plus between micro-batches), total count (int32).
    """
    count = jnp.asarray(moments.count)
    mean = moments.mean
    dtype = jnp.promote_types(mean.dtype, jnp.float32)
    n = jnp.where(count >= 2, count, 0).astype(dtype)
    nb = jnp.reshape(n, n.shape + (1,) * (mean.ndim - n.ndim))
    total = jnp.sum(n, axis=0)
    total_b = jnp.maximum(jnp.sum(nb, axis=0), 1)
    pooled_mean = jnp.sum(nb * mean.astype(dtype), axis=0) / total_b
    delta = mean.astype(dtype) - pooled_mean
    m2 = jnp.sum(nb * moments.var.astype(dtype), axis=0) + jnp.sum(nb * delta * delta, axis=0)
    return Moments(pooled_mean, m2 / total_b, total.astype(jnp.int32))


def corrected_momentum(momentum: float, accum_steps: int) -> float:
    """The per-micro-batch momentum that decays old statistics as one step would.

    $$m_k = 1 - (1 - m)^{1/k}$$, so that `(1 - m_k)^k == 1 - m` (computed without
    cancellation).

    Args:
      momentum: the BatchNorm's momentum m (PyTorch's convention), in [0, 1].
      accum_steps: the number of micro-batches k per optimizer step, >= 1.

    Returns:
      m_k, a Python float.

    Raises:
      ValueError: `momentum` outside [0, 1] or `accum_steps` < 1.

    Example:
      >>> round(bnjax.training.corrected_momentum(0.19, 2), 12)
      0.1
    """
    check_unit_interval("momentum", momentum)
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"bnjax.training: accum_steps must be an int >= 1, got {accum_steps!r}.")
    momentum = float(momentum)
    if momentum >= 1:
        return 1.0
    return -math.expm1(math.log1p(-momentum) / accum_steps)


_POLICIES: Mapping[str, Callable[[], StatsPolicy]] = MappingProxyType(
    {"micro": micro, "corrected": corrected, "full": full}
)


def resolve(stats_policy: str | StatsPolicy) -> StatsPolicy:
    """A `StatsPolicy` from one (returned as is) or from its name."""
    if isinstance(stats_policy, StatsPolicy):
        return stats_policy
    if isinstance(stats_policy, str) and stats_policy in _POLICIES:
        return _POLICIES[stats_policy]()
    raise ValueError(
        f"bnjax.training: stats_policy must be one of {tuple(_POLICIES)} or a "
        f"bnjax.training.StatsPolicy, got {stats_policy!r}."
    )


# --------------------------------------------------------------------------- layers


def trained_layers(
    stats: PyTree, reports: PyTree, policy: str, *, stacked: bool = False
) -> list[tuple[Path, BatchNormReport]]:
    """Every BatchNorm of `stats` that trained (used batch moments), with its report.

    `reports` is aligned with `stats` (a report where `stats` has a BatchNorm's
    dict). With `stacked`, reports carry one extra leading (micro-batch) axis.

    Raises:
      ValueError: no reports at all, a BatchNorm without a report, a report where
        `stats` has no BatchNorm, or a layer updated more than once per micro-batch.
    """
    if reports is None:
        raise ValueError(
            f"bnjax.training: stats_policy={policy!r} reads each BatchNorm's momentum and "
            "batch moments from its report, but loss_fn returned none. Return them as a "
            "third element: `return loss, (new_batch_stats, aux, reports)`, with\n"
            "  linen: `model.apply(..., mutable=['batch_stats', bnjax.linen.REPORTS])` "
            "and `reports = updates[bnjax.linen.REPORTS]`;\n"
            "  nnx: `y, reports = nnx.capture(model, bnjax.nnx.Reports)(x)`;\n"
            "  functional: `bn = bnjax.batch_norm(...)`, "
            "`y, moments = bn.normalize(...)`, `reports = {...: bn.report(moments)}`.\n"
            "Or use stats_policy='micro', which needs none."
        )
    found = tree.reports_at(reports)
    layers = []
    for path in tree.stats_at(stats):
        report = found.pop(path, None)
        if report is None:
            raise ValueError(
                f"bnjax.training: stats_policy={policy!r}: the BatchNorm at '{path_name(path)}' "
                "returned no report (reports are aligned with batch_stats; found reports at "
                f"{sorted(map(path_name, tree.reports_at(reports)))}). A Flax BatchNorm inside "
                "nn.scan/nn.vmap/nn.remat reports only if the transform passes the "
                "collection: add bnjax.linen.REPORTS to its `variable_axes` (as "
                "'batch_stats'). A functional BatchNorm that is not trained here reports "
                "`bn.report(None)`."
            )
        if not report.trained:
            continue
        rm = tree.get(stats, path)["running_mean"]
        extra = report.mean.ndim - rm.ndim - (1 if stacked else 0)
        if extra > 0:
            raise ValueError(
                f"bnjax.training: stats_policy={policy!r} needs each BatchNorm's statistics "
                "to be updated once per micro-batch, but the BatchNorm at "
                f"'{path_name(path)}' was updated {report.mean.shape[int(stacked)]} times "
                "(twice or more: a shared layer called several times in training mode, or "
                "one carried through nn.scan with variable_carry). Use "
                "stats_policy='micro', or give each call its own statistics."
            )
        layers.append((path, report))
    unmatched = [p for p, r in found.items() if r.config.track_running_stats]
    if unmatched:
        raise ValueError(
            f"bnjax.training: reports at {sorted(map(path_name, unmatched))} have no BatchNorm "
            "statistics at the same path in batch_stats; return each report at its "
            "layer's path."
        )
    return layers
