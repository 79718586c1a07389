"""Accumulation-aware training steps for models with BatchNorm (needs optax).

Gradient accumulation is where BatchNorm quietly goes wrong: each micro-batch is
normalized with its own statistics, and the running statistics move once per
micro-batch, not once per optimizer step. `make_train_step` builds one pure step
that runs k micro-batches under a single `lax.scan`, threads `batch_stats` through
them in order, reduces the gradients and applies one optax update, with a
documented choice of how the running statistics treat the micro-batches:

| stats_policy  | running statistics after one step of k micro-batches             |
|---------------|------------------------------------------------------------------|
| `"micro"`     | k updates with the layer's momentum m (PyTorch's loop)           |
| `"corrected"` | k updates with m_k = 1 - (1 - m)^(1/k): old stats decay as once  |
| `"full"`      | 1 update with the pooled mean and unbiased variance of all k*B   |

The forward pass always normalizes each micro-batch with its own batch statistics.
See docs/accumulation.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax import _accumulate

__all__ = [
    "StepMetrics",
    "batchnorm_mask",
    "corrected_momentum",
    "freeze_batchnorm",
    "make_train_step",
    "split_micro_batches",
]

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, tuple[PyTree, PyTree]]]
StatsPolicy = Literal["micro", "corrected", "full"]

_POLICIES = ("micro", "corrected", "full")
_REDUCTIONS = ("mean", "sum")
_STAT_KEYS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


class StepMetrics(NamedTuple):
    """What one accumulated step reports, stacked over its k micro-batches."""

    loss: jax.Array  # (k,): each micro-batch's loss, in order
    aux: PyTree  # loss_fn's aux, each leaf with a leading axis k


def corrected_momentum(momentum: float, accum_steps: int) -> float:
    """The per-micro-batch momentum that decays old statistics as one step would.

    $$m_k = 1 - (1 - m)^{1/k}$$, so that `(1 - m_k)^k == 1 - m`.

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
    _check_accum_steps(accum_steps)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}.")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}.")
    return _accumulate.corrected_momentum(float(momentum), accum_steps)


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
    stats_policy: StatsPolicy = "micro",
    unroll: int | bool = 1,
) -> Callable[[PyTree, PyTree, PyTree, PyTree], tuple[PyTree, PyTree, PyTree, StepMetrics]]:
    r"""Builds a pure training step that accumulates k micro-batches under one `lax.scan`.

    `step(params, batch_stats, opt_state, batch)` runs `loss_fn` on the k
    micro-batches of `batch` in order (one compiled body, not k copies), threading
    the BatchNorm statistics through them, reduces the k gradients, and applies one
    `optimizer` update:

    $$g = \frac{1}{k}\sum_{i=1}^{k} \nabla_\theta L_i \quad (\text{or } \sum_i \text{ for "sum"})$$

    How the running statistics treat the micro-batches (`m` is each BatchNorm's own
    momentum, as `bnjax.apply` was called inside `loss_fn`):

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

    For `"corrected"` and `"full"` the step learns each BatchNorm's momentum and count
    n (values per feature) while tracing `loss_fn`, so `loss_fn` needs no changes,
    but each BatchNorm must read its statistics straight from the `batch_stats`
    passed in (not copied or cast, no `jax.vmap`/`jax.checkpoint` around it inside
    `loss_fn`), return its new ones at the same path, and update once per
    micro-batch. Leaves of `batch_stats` not written by
    `bnjax.apply` in training mode (eval-mode BatchNorm, other state) are threaded
    as `loss_fn` returns them, whatever the policy. With `accum_steps=1` every policy
    is the plain step.

    Relation to `optax.MultiSteps`: MultiSteps accumulates *across calls* (one
    micro-batch per call, an update every k-th call, gradients kept in the optimizer
    state); this step accumulates *within one call*, so the gradient accumulator is
    a scan carry and never stored. With MultiSteps you thread `batch_stats` yourself
    from call to call; that is the `"micro"` policy. Do not wrap `optimizer` in
    MultiSteps here (it would accumulate k steps of k).

    Args:
      loss_fn: `loss_fn(params, batch_stats, micro_batch) -> (loss, (new_batch_stats,
        aux))`, with BatchNorm in training mode; `loss` a scalar, `new_batch_stats`
        with `batch_stats`' structure, shapes and dtypes.
      optimizer: an optax `GradientTransformation`, applied once per step.
      accum_steps: the number of micro-batches k per optimizer step, >= 1.
      grad_reduction: `"mean"` (default) divides the summed gradients by k;
        `"sum"` matches a PyTorch loop calling `backward()` on each unscaled loss.
      stats_policy: `"micro"` (default), `"corrected"` or `"full"`, see above.
      unroll: forwarded to `lax.scan`. Keep the default 1 (one compiled body) except
        on XLA:CPU with convolutions, whose kernel gradients run far slower inside a
        loop body there (jax-ml/jax#12868): `unroll=True` copies the body k times,
        which is fast on CPU but compiles longer.

    Returns:
      `step(params, batch_stats, opt_state, batch, *loss_args) -> (params,
      batch_stats, opt_state, metrics)`, a pure function to wrap in `jax.jit`.
      `loss_args` (none by default) reach every micro-batch's call as
      `loss_fn(params, batch_stats, micro_batch, *loss_args)`: values that change
      from step to step without recompiling, e.g. a Batch Renormalization
      `rmax`/`dmax` ramp (`bnjax.Renorm(rmax=rmax_t, ...)` inside `loss_fn`). Every leaf of
      `batch` has a leading axis of size k (use `split_micro_batches` on a flat
      batch of k*B). `metrics` is a `StepMetrics` of the k losses and auxes.

    Raises:
      ValueError: bad `accum_steps`, `grad_reduction` or `stats_policy` (when
        called); when tracing the step, a batch whose leading axes are not k, a
        `loss_fn` whose statistics change structure, shape or dtype, or (for
        `"corrected"`/`"full"`) statistics that cannot be traced back to
        `bnjax.apply`, and `"corrected"` with `momentum=None`.

    Example:
      >>> import jax, optax
      >>> def loss_fn(params, batch_stats, batch):
      ...     y, stats = bnjax.apply(params, batch_stats, batch, train=True)
      ...     return jnp.mean(y**2), (stats, None)
      >>> params, batch_stats = bnjax.init(3)
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
    if stats_policy not in _POLICIES:
        raise ValueError(
            f"bnjax.training: stats_policy must be one of {_POLICIES}, got {stats_policy!r}."
        )
    k = accum_steps
    policy = "micro" if k == 1 else stats_policy

    def step(params, batch_stats, opt_state, batch, *loss_args):
        _check_batch(batch, k)
        s0, stats_def = jax.tree.flatten(batch_stats)
        static: dict[str, Any] = {}  # filled while tracing: the layers (static info)

        def traced_loss(p, stats_leaves, micro_batch):
            stats = jax.tree.unflatten(stats_def, stats_leaves)
            if policy == "micro":
                loss, (new_stats, aux) = loss_fn(p, stats, micro_batch, *loss_args)
                new_leaves = _check_new_stats(new_stats, stats_def, stats_leaves)
                return loss, (new_leaves, aux, [])
            with _accumulate.observe_updates() as records:
                loss, (new_stats, aux) = loss_fn(p, stats, micro_batch, *loss_args)
            new_leaves = _check_new_stats(new_stats, stats_def, stats_leaves)
            layers, counts = _accumulate.match_layers(records, stats_leaves, policy)
            if policy == "corrected":
                _accumulate.check_corrected(layers)
            static["layers"] = layers
            counts = [jnp.asarray(c, jnp.int32) for c in counts]
            return loss, (new_leaves, aux, counts)

        grad_fn = jax.value_and_grad(traced_loss, has_aux=True)

        # Probe once (abstractly, no compute) for the layers, to size the "full" sums.
        if policy == "full":
            jax.eval_shape(grad_fn, params, s0, jax.tree.map(lambda x: x[0], batch))
        layers = static.get("layers", [])

        grads0 = jax.tree.map(lambda p: jnp.zeros(p.shape, _acc_dtype(p.dtype)), params)
        pool0 = _accumulate.pool_init(s0, layers) if policy == "full" else None

        def body(carry, micro_batch):
            grads_acc, stats_in, pool = carry
            (loss, (out, aux, counts)), grads = grad_fn(params, stats_in, micro_batch)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
            if policy == "micro":
                stats_next = out
            elif policy == "corrected":
                stats_next = _accumulate.corrected_update(stats_in, out, static["layers"], k)
            else:  # "full": recorded layers restart from s0; sums carry the rest.
                stats_next = list(out)
                for layer in static["layers"]:
                    for i in (layer.mean, layer.var, layer.nbt):
                        stats_next[i] = s0[i]
                pool = _accumulate.pool_add(pool, s0, out, static["layers"], counts)
            return (grads_acc, stats_next, pool), (loss, aux)

        if k == 1:  # the plain step: no loop at all
            carry, ys = body((grads0, list(s0), pool0), jax.tree.map(lambda a: a[0], batch))
            (grads_sum, stats_out, pool), (losses, auxes) = (
                carry,
                jax.tree.map(lambda a: jnp.expand_dims(a, 0), ys),
            )
        else:
            (grads_sum, stats_out, pool), (losses, auxes) = lax.scan(
                body, (grads0, list(s0), pool0), batch, length=k, unroll=unroll
            )
        if policy == "full":
            stats_out = _accumulate.pool_finish(pool, stats_out, layers)

        scale = 1.0 / k if grad_reduction == "mean" else 1.0
        grads = jax.tree.map(
            lambda g, p: (g * jnp.asarray(scale, g.dtype)).astype(p.dtype), grads_sum, params
        )
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_batch_stats = jax.tree.unflatten(stats_def, stats_out)
        return new_params, new_batch_stats, new_opt_state, StepMetrics(losses, auxes)

    return step


def batchnorm_mask(params: PyTree, batch_stats: PyTree) -> PyTree:
    """Marks the BatchNorm parameters of `params`, found through `batch_stats`.

    A BatchNorm is a dict of `batch_stats` with keys `running_mean`, `running_var`,
    `num_batches_tracked`; the parameters at the same path in `params` (its `weight`
    and `bias`) are marked True, every other leaf False. This holds for the
    functional convention (`params["block"]["bn"]` beside
    `batch_stats["block"]["bn"]`) and for Flax collections.

    Args:
      params: the model's parameters.
      batch_stats: the model's BatchNorm statistics, at the same paths.

    Returns:
      A tree of Python bools with `params`' structure, for `optax.masked`.

    Raises:
      ValueError: `batch_stats` holds no BatchNorm statistics.

    Example:
      >>> p, s = bnjax.init(3)
      >>> bnjax.training.batchnorm_mask({"bn": p, "w": jnp.ones(2)}, {"bn": s})
      {'bn': {'bias': True, 'weight': True}, 'w': False}
    """
    bn_paths = set()

    def visit(path, node):
        if isinstance(node, dict) and _STAT_KEYS <= set(node):
            bn_paths.add(path)
            return
        if isinstance(node, dict):
            for key, child in node.items():
                visit((*path, key), child)

    visit((), _as_dict(batch_stats))
    if not bn_paths:
        raise ValueError(
            "bnjax.training.batchnorm_mask: batch_stats holds no BatchNorm statistics "
            f"(no dict with keys {sorted(_STAT_KEYS)})."
        )

    def is_bn(path, _leaf):
        keys = tuple(getattr(entry, "key", getattr(entry, "name", entry)) for entry in path)
        return any(keys[: len(bn)] == bn for bn in bn_paths)

    return jax.tree_util.tree_map_with_path(is_bn, params)


def freeze_batchnorm(
    optimizer: optax.GradientTransformation, params: PyTree, batch_stats: PyTree
) -> optax.GradientTransformation:
    """Wraps `optimizer` so that BatchNorm parameters never change ("frozen BN").

    BatchNorm weights get zero updates and no optimizer state (as PyTorch parameters
    with `requires_grad=False`: no momentum, no weight decay); every other parameter
    is updated by `optimizer`. Pair it with a `loss_fn` that calls BatchNorm with
    `train=False`, so the running statistics are used and left bit-identical.

    Args:
      optimizer: the optax transformation for the trainable parameters.
      params: the model's parameters (only their structure is used).
      batch_stats: the model's BatchNorm statistics, at the same paths as
        their parameters (see `batchnorm_mask`).

    Returns:
      An `optax.multi_transform` of `optimizer` and `optax.set_to_zero()`.

    Raises:
      ValueError: `batch_stats` holds no BatchNorm statistics.

    Example:
      >>> import jax, optax
      >>> p, s = bnjax.init(3)
      >>> params, batch_stats = {"bn": p, "w": jnp.ones(3)}, {"bn": s}
      >>> opt = bnjax.training.freeze_batchnorm(optax.sgd(0.1), params, batch_stats)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> updates["bn"]["weight"]
      Array([0., 0., 0.], dtype=float32)
    """
    labels = jax.tree.map(
        lambda frozen: "frozen" if frozen else "train", batchnorm_mask(params, batch_stats)
    )
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def _as_dict(tree: PyTree) -> Any:
    """Plain nested dicts (Flax FrozenDicts and other mappings become dicts)."""
    if hasattr(tree, "items"):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


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
