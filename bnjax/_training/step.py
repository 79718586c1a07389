"""The implementation behind `bnjax.training` (its docstring is the guide).

Accumulation-aware training steps for models with BatchNorm (needs optax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._core.extras import needs
from bnjax._core.report import collect_reports
from bnjax._model import tree
from bnjax._training import policies as _policies
from bnjax._training.policies import StatsPolicy

with needs("bnjax.training", "optax"):
    import optax


PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, tuple[PyTree, ...]]]
AxisName = Any  # a named axis (`shard_map`, `pmap`, `vmap`) or a tuple of them

_REDUCTIONS = ("mean", "sum")


class StepMetrics(NamedTuple):
    """What one accumulated step reports, stacked over its k micro-batches."""

    loss: jax.Array  # (k,): each micro-batch's loss, in order
    aux: PyTree  # loss_fn's aux, each leaf with a leading axis k
    # () bool: the step changed nothing because a loss or a gradient was not finite
    # (`skip_nonfinite=True`); always False without the guard.
    skipped: jax.Array | bool = False


def split_micro_batches(batch: PyTree, accum_steps: int) -> PyTree:
    """Reshapes a flat batch of k*B examples into k micro-batches of B.

    Every leaf of shape `(k * B, ...)` becomes `(k, B, ...)`; micro-batch i holds
    examples `i * B` to `(i + 1) * B - 1`, the order a PyTorch loop over
    `batch.split(B)` sees.

    Args:
      batch: a pytree of arrays sharing a leading axis of size divisible by k.
      accum_steps: the number of micro-batches k.

    Returns:
      The same pytree with leaves of shape `(k, B, ...)`.

    Raises:
      ValueError: a leaf is a scalar, the leading axes differ, or are not divisible by k.

    Example:
      >>> x = jnp.zeros((64, 3))
      >>> bnjax.training.split_micro_batches(x, 4).shape
      (4, 16, 3)
    """
    _check_accum_steps(accum_steps)
    leaves, treedef = jax.tree.flatten(batch)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) > 1 or any(s % accum_steps for s in sizes):
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        raise ValueError(
            "bnjax.training.split_micro_batches: every leaf needs the same leading axis, "
            f"divisible by accum_steps={accum_steps}; got leaf shapes {shapes}."
        )
    out = [
        jnp.reshape(leaf, (accum_steps, jnp.shape(leaf)[0] // accum_steps, *jnp.shape(leaf)[1:]))
        for leaf in leaves
    ]
    return jax.tree.unflatten(treedef, out)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    grad_reduction: Literal["mean", "sum"] = "mean",
    stats_policy: Literal["micro", "corrected", "full"] | StatsPolicy = "micro",
    unroll: int | bool = 1,
    skip_nonfinite: bool = False,
    axis_name: AxisName | None = None,
) -> Callable[[PyTree, PyTree, PyTree, PyTree], tuple[PyTree, PyTree, PyTree, StepMetrics]]:
    r"""Builds a pure training step that accumulates k micro-batches under one `lax.scan`.

    `step(params, batch_stats, opt_state, batch)` runs `loss_fn` on the k
    micro-batches of `batch` in order (one compiled body, not k copies), threading
    the BatchNorm statistics through them, reduces the k gradients, and applies one
    `optimizer` update:

    $$g = \frac{1}{k}\sum_{i=1}^{k} \nabla_\theta L_i \quad (\text{or } \sum_i \text{ for "sum"})$$

    How the running statistics treat the micro-batches (`m` is each BatchNorm's own
    momentum):

    - `"micro"`: each micro-batch updates them with m, as a PyTorch loop that calls
      the model k times per `optimizer.step()` does. `num_batches_tracked += k`.
    - `"corrected"`: each micro-batch updates them with
      `m_k = 1 - (1 - m)^(1/k)`, so that the old statistics decay by `1 - m` per
      optimizer step whatever k is. `num_batches_tracked += k`.
    - `"full"`: one update per step with the pooled mean and unbiased pooled variance
      of all k micro-batches (as one big-batch step of k*B would record, for layers
      whose inputs do not depend on the normalization, e.g. the first BatchNorm).
      Each micro-batch still normalizes with its own statistics. `num_batches_tracked
      += 1`. `momentum=None` (cumulative average) counts the step once.
    - a `StatsPolicy` of your own (see `micro`, `corrected`, `full`).

    `"corrected"` and `"full"` read each BatchNorm's momentum and batch moments from
    its `bnjax.BatchNormReport`, which `loss_fn` returns as a third element of its
    aux, aligned with `batch_stats` (the Flax collections as they come are fine):

    - linen: `y, updates = model.apply(variables, x, train=True,
      mutable=["batch_stats", bnjax.linen.REPORTS])`, then return
      `(updates["batch_stats"], aux, updates[bnjax.linen.REPORTS])`; inside
      `nn.scan`/`nn.vmap`, give `bnjax.linen.REPORTS` the same `variable_axes` as
      `"batch_stats"`;
    - nnx: `y, reports = nnx.capture(model, bnjax.nnx.Reports)(x)`;
    - functional: `bn = bnjax.batch_norm(...)`, `y, moments = bn.normalize(p, s, x,
      True)`, `new_s = bn.update_stats(s, moments)`, report `bn.report(moments)` at the
      layer's path (`bn.report(None)` for a layer in eval mode).

    Leaves of `batch_stats` that are no BatchNorm's statistics are threaded as
    `loss_fn` returns them, whatever the policy. With `accum_steps=1` every policy is
    the plain step (reports are not needed).

    Relation to `optax.MultiSteps`: MultiSteps accumulates *across calls* (one
    micro-batch per call, an update every k-th call, gradients kept in the optimizer
    state); this step accumulates *within one call*, so the gradient accumulator is
    a scan carry and never stored. With MultiSteps you thread `batch_stats` yourself
    from call to call; that is the `"micro"` policy. Do not wrap `optimizer` in
    MultiSteps here (it would accumulate k steps of k).

    Args:
      loss_fn: `loss_fn(params, batch_stats, micro_batch) -> (loss, (new_batch_stats,
        aux))` or `(loss, (new_batch_stats, aux, reports))`, with BatchNorm in
        training mode; `loss` a scalar, `new_batch_stats` with `batch_stats`'
        structure, shapes and dtypes (a dict, `FrozenDict` or `nnx.State`).
      optimizer: an optax `GradientTransformation`, applied once per step.
      accum_steps: the number of micro-batches k per optimizer step, >= 1.
      grad_reduction: `"mean"` (default) divides the summed gradients by k;
        `"sum"` matches a PyTorch loop calling `backward()` on each unscaled loss.
      stats_policy: `"micro"` (default), `"corrected"`, `"full"`, or a `StatsPolicy`.
      unroll: forwarded to `lax.scan`. Keep the default 1 (one compiled body) except
        on XLA:CPU with convolutions, whose kernel gradients run far slower inside a
        loop body there (jax-ml/jax#12868): `unroll=True` copies the body k times,
        which is fast on CPU but compiles longer.
      skip_nonfinite: make the step transactional: when any micro-batch's loss or
        any reduced gradient is not finite (NaN or inf), return `params`,
        `batch_stats` and `opt_state` bit-identical to the inputs and set
        `metrics.skipped`. The decision is one `lax.cond` on a traced flag (no
        Python branch, one compiled program). Default off: a NaN should be loud
        unless asked otherwise (docs/accumulation.md, "Steps that go wrong").
      axis_name: with `skip_nonfinite`, the named axis (or tuple of axes) the
        step runs under in per-device code (`shard_map`, `pmap`, `vmap`): the
        finite flag is reduced over it so that every replica makes the same
        decision. Not needed under `jit` with sharded arrays (the flag is then
        computed from global values), nor with one device.

    Returns:
      `step(params, batch_stats, opt_state, batch, *loss_args) -> (params,
      batch_stats, opt_state, metrics)`, a pure function to wrap in `jax.jit`.
      `loss_args` (none by default) reach every micro-batch's call as
      `loss_fn(params, batch_stats, micro_batch, *loss_args)`: values that change
      from step to step without recompiling, e.g. a Batch Renormalization
      `rmax`/`dmax` ramp (`bnjax.Renorm(rmax=rmax_t, ...)` inside `loss_fn`).
      Every leaf of `batch` has a leading axis of size k (use `split_micro_batches` on a flat
      batch of k*B). `metrics` is a `StepMetrics` of the k losses and auxes, and
      whether the step was skipped.

    Raises:
      ValueError: bad `accum_steps`, `grad_reduction` or `stats_policy`, or an
        `axis_name` without `skip_nonfinite` (when called); when tracing the step,
        a batch whose leading axes are not k, a `loss_fn` whose statistics change
        structure, shape or dtype, and (for `"corrected"`/`"full"`) a `loss_fn`
        that returns no report for a BatchNorm, a layer updated twice per
        micro-batch, and `"corrected"` with `momentum=None`.

    Example:
      >>> import jax, optax
      >>> bn = bnjax.batch_norm(momentum=0.1)
      >>> def loss_fn(params, batch_stats, batch):
      ...     y, moments = bn.normalize(params, batch_stats, batch, train=True)
      ...     new_stats = bn.update_stats(batch_stats, moments)
      ...     return jnp.mean(y**2), (new_stats, None, bn.report(moments))
      >>> params, batch_stats = bn.init(3)
      >>> opt = optax.sgd(0.1)
      >>> step = jax.jit(bnjax.training.make_train_step(
      ...     loss_fn, opt, accum_steps=4, stats_policy="full"))
      >>> batch = jnp.ones((4, 8, 3)) * jnp.arange(8.0)[:, None]  # 4 micro-batches of 8
      >>> params, batch_stats, opt_state, metrics = step(
      ...     params, batch_stats, opt.init(params), batch)
      >>> metrics.loss.shape, int(batch_stats["num_batches_tracked"])
      ((4,), 1)
    """
    _check_accum_steps(accum_steps)
    if grad_reduction not in _REDUCTIONS:
        raise ValueError(
            f"bnjax.training: grad_reduction must be one of {_REDUCTIONS}, got {grad_reduction!r}."
        )
    policy = _policies.resolve(stats_policy)
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"bnjax.training: skip_nonfinite must be a bool, got {skip_nonfinite!r}.")
    if axis_name is not None and not skip_nonfinite:
        raise ValueError(
            "bnjax.training: `axis_name` names the axes over which the skip decision of "
            "`skip_nonfinite=True` is shared; it does nothing without it. Pass "
            "skip_nonfinite=True, or drop axis_name (BatchNorm layers take their own)."
        )
    k = accum_steps
    if k == 1:  # one micro-batch: every policy is the plain step
        policy = _policies.micro()

    def step(params, batch_stats, opt_state, batch, *loss_args):
        _check_batch(batch, k)
        view = tree.TreeView(batch_stats, "bnjax.training")
        s0 = view.plain(jax.tree.leaves(batch_stats))

        def traced_loss(p, stats_plain, micro_batch):
            loss, out = loss_fn(p, view.user(stats_plain), micro_batch, *loss_args)
            new_stats, aux, reports = _unpack_aux(out)
            new_leaves = _check_new_stats(new_stats, view.treedef, view.leaves(stats_plain))
            if reports is not None:
                reports = collect_reports(reports)
            return loss, (view.plain(new_leaves), aux, reports)

        grad_fn = jax.value_and_grad(traced_loss, has_aux=True)
        grads0 = jax.tree.map(lambda p: jnp.zeros(p.shape, _acc_dtype(p.dtype)), params)
        state0 = policy.init(s0, k)

        def body(carry, micro_batch):
            grads_acc, stats_in, state = carry
            (loss, (stats_out, aux, reports)), grads = grad_fn(params, stats_in, micro_batch)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
            stats_next, state = policy.update(state, stats_in, stats_out, reports, k)
            return (grads_acc, stats_next, state), (loss, aux, reports)

        if k == 1:  # the plain step: no loop at all
            carry, ys = body((grads0, s0, state0), jax.tree.map(lambda a: a[0], batch))
            ys = jax.tree.map(lambda a: jnp.expand_dims(a, 0), ys)
        else:
            carry, ys = lax.scan(body, (grads0, s0, state0), batch, length=k, unroll=unroll)
        grads_sum, stats_last, state = carry
        losses, auxes, reports = ys
        new_stats = policy.finish(state, s0, stats_last, reports, k)

        scale = 1.0 / k if grad_reduction == "mean" else 1.0
        grads = jax.tree.map(
            lambda g, p: (g * jnp.asarray(scale, g.dtype)).astype(p.dtype), grads_sum, params
        )
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new = (new_params, view.user(new_stats), new_opt_state)
        if not skip_nonfinite:
            return (*new, StepMetrics(losses, auxes, jnp.zeros((), bool)))
        ok = all_finite((losses, grads), axis_name)
        # One decision for the whole state: the new trees, or the inputs as they came.
        kept = lax.cond(ok, lambda: new, lambda: (params, batch_stats, opt_state))
        return (*kept, StepMetrics(losses, auxes, jnp.logical_not(ok)))

    return step


def all_finite(tree: PyTree, axis_name: AxisName | None = None) -> jax.Array:
    """Whether every floating-point value of `tree` is finite, on every replica.

    A boolean scalar; integer leaves count as finite. Under `axis_name` (a named
    axis or a tuple of them) it is True only when it holds on every replica.
    """
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    ok = jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
    if axis_name is not None:
        # pmin of 0/1: one all-reduce of one value, the same answer on every replica.
        ok = lax.pmin(ok.astype(jnp.int32), axis_name) > 0
    return ok


def _acc_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _check_accum_steps(accum_steps: Any) -> None:
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"bnjax.training: accum_steps must be an int >= 1, got {accum_steps!r}.")


def _check_batch(batch: PyTree, k: int) -> None:
    leaves = jax.tree.leaves(batch)
    if not leaves or any(jnp.ndim(x) == 0 or jnp.shape(x)[0] != k for x in leaves):
        shapes = [tuple(jnp.shape(x)) for x in leaves]
        raise ValueError(
            f"bnjax.training: the step expects a batch of accum_steps={k} micro-batches, "
            f"every leaf with a leading axis of size {k}; got leaf shapes {shapes}. "
            "Split a flat batch with `bnjax.training.split_micro_batches(batch, k)`."
        )


def _unpack_aux(out: Any) -> tuple[PyTree, PyTree, PyTree]:
    """`(new_batch_stats, aux)` or `(new_batch_stats, aux, reports)`."""
    if isinstance(out, tuple) and len(out) in (2, 3):
        return out if len(out) == 3 else (*out, None)
    raise ValueError(
        "bnjax.training: loss_fn must return `(loss, (new_batch_stats, aux))` or "
        f"`(loss, (new_batch_stats, aux, reports))`; got `(loss, {type(out).__name__})`"
        + (f" of length {len(out)}" if isinstance(out, tuple) else "")
        + "."
    )


def _check_new_stats(new_stats: PyTree, stats_def: Any, stats_leaves: list[Any]) -> list[Any]:
    new_leaves, new_def = jax.tree.flatten(new_stats)
    if new_def != stats_def:
        raise ValueError(
            "bnjax.training: loss_fn must return new_batch_stats with the structure of "
            f"batch_stats; got {new_def}, expected {stats_def}."
        )
    for old, new in zip(stats_leaves, new_leaves, strict=True):
        if jnp.shape(old) != jnp.shape(new) or jnp.result_type(old) != jnp.result_type(new):
            raise ValueError(
                "bnjax.training: loss_fn changed a batch_stats leaf from "
                f"{jnp.result_type(old)}{list(jnp.shape(old))} to "
                f"{jnp.result_type(new)}{list(jnp.shape(new))}; it must keep shapes and dtypes."
            )
    return new_leaves
