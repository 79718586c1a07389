"""`BatchNormReport`: the one explicit channel from a BatchNorm to whole-model tools.

A report is what one BatchNorm call tells the tools around it (the training step's
statistics policies, precise BN, folding): the batch moments it normalized with
(array leaves: mean, biased variance, count) and its static `BatchNormConfig`
(pytree aux data, so momentum, eps and axis travel with the arrays through `jit`,
`scan`, `vmap` and Flax collections). An eval-mode call (running statistics) reports
its config with no moments.

Reports flow as values, never through module-level state:

- `bnjax.linen.BatchNorm` sows its report into the Flax collection
  `bnjax.linen.REPORTS` when (and only when) the caller makes it mutable;
- `bnjax.nnx.BatchNorm` sows it as a `bnjax.nnx.Reports` variable under
  `nnx.capture(..., bnjax.nnx.Reports)`;
- a functional model builds it with `layer.report(moments)` and returns it.

`collect_reports` turns either collection into a tree aligned with `batch_stats`:
where `batch_stats` holds a BatchNorm's dict, the reports tree holds its report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._core.config import BatchNormConfig
from bnjax._core.conventions import to_plain_dict
from bnjax._core.stats import Moments

Array = jax.Array

REPORT_NAME = "report"  # the variable name a Flax BatchNorm sows its report under


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchNormReport:
    """One BatchNorm call's record: its batch moments (leaves) and its config (static).

    Leading axes beyond the features' shape stack several calls: a layer inside
    `nn.scan`/`nn.vmap` with stacked statistics has one per stacked layer; a layer
    called several times (a shared layer, `variable_carry`) has one per call.

    Attributes:
      mean: per-feature batch mean (float32 at least), or None for an eval-mode call.
      var: per-feature biased batch variance, or None.
      count: values per feature that counted (int32), or None.
      config: the layer's `BatchNormConfig` (pytree aux data: static).

    Example:
      >>> bn = bnjax.batch_norm(momentum=0.2)
      >>> params, stats = bn.init(2)
      >>> y, moments = bn.normalize(params, stats, jnp.ones((4, 2)), train=True)
      >>> report = bn.report(moments)
      >>> report.config.momentum, int(report.count), report.trained
      (0.2, 4, True)
    """

    mean: Array | None
    var: Array | None
    count: Array | None
    config: BatchNormConfig = dataclasses.field(metadata={"static": True})

    @property
    def trained(self) -> bool:
        """Whether the call used batch statistics (and so has moments)."""
        return self.mean is not None

    @property
    def moments(self) -> Moments | None:
        """The batch moments as a `bnjax.Moments`, or None for an eval-mode call."""
        if self.mean is None:
            return None
        return Moments(self.mean, self.var, self.count)  # type: ignore[arg-type]


def make_report(moments: Moments | None, config: BatchNormConfig) -> BatchNormReport:
    """A report of `moments` (None: eval mode), held out of autodiff like a buffer."""
    if moments is None:
        return BatchNormReport(None, None, None, config)
    mean, var = jax.lax.stop_gradient((moments.mean, moments.var))
    count = jnp.asarray(moments.count, jnp.int32)
    return BatchNormReport(mean, var, count, config)


def collect_reports(collection: Any) -> Any:
    """Reports sown by the Flax modules, as a tree aligned with `batch_stats`.

    Takes the `bnjax.linen.REPORTS` collection (`updates[bnjax.linen.REPORTS]`) or
    the state `nnx.capture(..., bnjax.nnx.Reports)` returns, where each BatchNorm
    holds `{"report": (report, ...)}` (one per call), and returns nested dicts in
    which each BatchNorm's node is one `BatchNormReport`: the path of a layer's
    report is the path of its statistics in `batch_stats`. Several calls of one
    layer are stacked on a new leading axis (eval-mode calls, with no moments, are
    dropped when the layer also trained).

    A functional model's reports, already one per layer, pass through unchanged.

    Args:
      collection: a mapping (dict, `FrozenDict`, `nnx.State`) of sown reports.

    Returns:
      Nested dicts with a `BatchNormReport` at each BatchNorm's path.

    Raises:
      ValueError: one layer's calls report different configs.

    Example:
      >>> import flax.linen as nn, bnjax.linen
      >>> bn = bnjax.linen.BatchNorm(momentum=0.2)
      >>> x = jnp.ones((4, 3))
      >>> variables = bn.init(jax.random.key(0), x, train=False)
      >>> y, updates = bn.apply(variables, x, train=True,
      ...                       mutable=["batch_stats", bnjax.linen.REPORTS])
      >>> report = bnjax.collect_reports(updates[bnjax.linen.REPORTS])
      >>> report.config.momentum, int(report.count)
      (0.2, 4)
    """
    return _collect(to_plain_dict(collection), ())


def _collect(node: Any, path: tuple[Any, ...]) -> Any:
    if isinstance(node, BatchNormReport):
        return node
    if isinstance(node, tuple) and node and all(isinstance(r, BatchNormReport) for r in node):
        return _merge(node, path)
    if isinstance(node, Mapping):
        if set(node) == {REPORT_NAME} and not isinstance(node[REPORT_NAME], Mapping):
            return _collect(node[REPORT_NAME], path)
        return {k: _collect(v, (*path, k)) for k, v in node.items()}
    return node


def _merge(reports: tuple[BatchNormReport, ...], path: tuple[Any, ...]) -> BatchNormReport:
    configs = {r.config for r in reports}
    if len(configs) > 1:
        raise ValueError(
            f"bnjax.collect_reports: the BatchNorm at {'/'.join(map(str, path))} reported "
            f"different configs in one call: {sorted(map(repr, configs))}."
        )
    trained = [r for r in reports if r.trained]
    if len(trained) <= 1:
        return trained[0] if trained else reports[0]
    mean, var, count = (
        jnp.stack([getattr(r, f) for r in trained]) for f in ("mean", "var", "count")
    )
    return BatchNormReport(mean, var, count, trained[0].config)
