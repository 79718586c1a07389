"""A check for the eval trap: inference outputs that depend on the rest of the batch.

In eval mode every example's output must be a function of that example alone. A
BatchNorm left in training mode (a forgotten `train=False`), or one without running
statistics, normalizes with the statistics of the batch, so an example's output
changes with its batch-mates and with the batch size. This check runs the model on
the same examples grouped differently and compares each example's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._core import deprecation, functional
from bnjax._model.run import model_kind


class EvalTrapError(AssertionError):
    """Eval-mode outputs depend on batch composition or size (see the message)."""


#: The automatic tolerance: `ROUNDING_FACTOR` times the output's measured float32 rounding
#: (its distance from the same model run in float64) plus `FLOOR_ULPS` units in the last
#: place of its largest value; `FALLBACK_ULPS` units when no float64 run is possible.
ROUNDING_FACTOR = 8.0
FLOOR_ULPS = 8.0
FALLBACK_ULPS = 4096.0


class EvalCheckReport(NamedTuple):
    """What `check_batch_independence` found."""

    ok: bool  # True when every example's outputs are the same however it is batched
    failures: tuple[str, ...]  # one line per (regrouping, output) that differs or raised
    max_abs_diff: float  # the largest difference seen over all regroupings and outputs
    tolerances: Mapping[str, float] = MappingProxyType({})  # output -> allowed |diff| (auto)
    rule: str = ""  # how the tolerance was set (measured rounding, estimate, or fixed)


def check_batch_independence(
    model: Any,
    *args: Any,
    rtol: float | None = None,
    atol: float | None = None,
    max_singles: int | None = 8,
    factor: float = ROUNDING_FACTOR,
    raise_on_failure: bool = True,
    **call_kwargs: Any,
) -> EvalCheckReport:
    """Checks that eval-mode outputs of each example do not depend on its batch.

    Three kinds of model, run as you would deploy them:

    - functional: `check_batch_independence(apply_fn, params, batch_stats, batch)`
      with `apply_fn(params, batch_stats, batch, bn) -> (outputs, new_batch_stats)`,
      the eval-mode forward in the one signature of a functional model (as for
      `fold` and `precise_bn`); `bn` is `bnjax.apply`. (The older
      `check_batch_independence(fn, variables, batch)` with `fn(variables, batch) ->
      outputs` still works in this release, with a `DeprecationWarning`.)
    - linen: `check_batch_independence(module, variables, batch, train=False)`:
      `module.apply(variables, batch, **call_kwargs)` (default `train=False`);
    - nnx: `check_batch_independence(model, batch)`: `model(batch, **call_kwargs)` in
      the mode the model is in now (a copy runs; `model` is not changed), so a
      forgotten `model.eval()` is caught.

    The forward runs on five regroupings of the same examples and each example's
    outputs are compared with those from the whole batch:

    - `singles`: each example alone (batch size 1), the first `max_singles` of them;
    - `reversed`: the batch in reverse order (order dependence);
    - `split`: the batch cut into two parts of unequal size, run separately;
    - `recomposed`: same size, other batch-mates (the first half twice);
    - `enlarged`: the batch followed by its first examples again (larger).

    Return intermediates from `apply_fn` (e.g. a dict of each layer's output) to
    learn *which layer* starts to differ: every output leaf is compared and named.

    How different is different: regrouping legitimately changes float32 rounding
    (kernels pick their blocking and algorithm from the batch size), by as much as the
    model's own float32 error. By default each output may differ by `ROUNDING_FACTOR`
    times that error, measured by running the whole batch once more in float64 (the
    variables and batch widened, under `jax.enable_x64`), plus `FLOOR_ULPS` units in
    the last place of the output's largest value; where no float64 run is possible
    (the model fails or keeps float32) `FALLBACK_ULPS` units. A BatchNorm in training
    mode changes outputs by a sizable fraction of their scale, far above either.

    Args:
      model: a functional `apply_fn`, a `flax.linen.Module` or a `flax.nnx.Module`.
        Every leaf of the batch and of the outputs has the batch as its leading axis.
      *args: functional: `params, batch_stats, batch`; linen: `variables, batch`;
        nnx: `batch`. The batch is a pytree of arrays, all with the same leading
        size N >= 2.
      rtol: a fixed relative tolerance instead of the automatic one (elementwise
        `|diff| <= atol + rtol |expected|`; the other defaults to 1e-5).
      atol: a fixed absolute tolerance instead of the automatic one.
      max_singles: how many examples to run alone (`None`: all N).
      factor: the automatic tolerance's multiple of the measured float32 rounding.
      raise_on_failure: raise `EvalTrapError` when a check fails (default), or
        only return the report.
      **call_kwargs: linen and nnx: keyword arguments of the model's call.

    Returns:
      An `EvalCheckReport(ok, failures, max_abs_diff, tolerances, rule)`.

    Raises:
      EvalTrapError: (an `AssertionError`) when outputs depend on the batch and
        `raise_on_failure` is True; the message names each regrouping and output.
      ValueError: `batch` has fewer than 2 examples or its leaves disagree on N, or
        an output leaf has no leading batch axis of size N.

    Example:
      >>> params, stats = bnjax.init(3)
      >>> def apply_fn(params, stats, x, bn):
      ...     return bn(params, stats, x, False)
      >>> check_batch_independence(apply_fn, params, stats, jnp.ones((4, 3))).ok
      True
    """
    apply_fn, variables, batch = _as_apply_fn(model, args, call_kwargs)
    n = _batch_size(batch)
    fn = jax.jit(apply_fn)
    reference = fn(variables, batch)
    ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
    for path, leaf in ref_leaves:
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
            raise ValueError(
                f"check_batch_independence: output {jax.tree_util.keystr(path) or '<root>'} "
                f"has shape {np.shape(leaf)}; every output needs the batch ({n}) as its "
                "leading axis."
            )
    ref_structure = jax.tree_util.tree_structure(reference)
    fixed = rtol is not None or atol is not None
    if fixed:
        rtol, atol = (1e-5 if rtol is None else rtol), (1e-5 if atol is None else atol)
        tolerances, rule = {}, f"fixed rtol={rtol:g}, atol={atol:g}"
    else:
        tolerances, rule = _rounding_tolerances(fn, variables, batch, ref_leaves, factor)

    def take(tree: Any, idx: np.ndarray) -> Any:
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[idx], tree)

    def run_groups(groups: list[np.ndarray]) -> Any:
        """Runs each group of example indices as one batch; outputs in original order."""
        outs = [fn(variables, take(batch, g)) for g in groups]
        for o in outs:
            if jax.tree_util.tree_structure(o) != ref_structure:
                raise ValueError(
                    "check_batch_independence: apply_fn returned a different output "
                    "structure for a different batch size."
                )
        order = np.argsort(np.concatenate(groups), kind="stable")
        return jax.tree_util.tree_map(
            lambda *leaves: np.concatenate([np.asarray(x) for x in leaves])[order], *outs
        )

    idx = np.arange(n)
    singles = idx if max_singles is None else idx[: max(1, max_singles)]
    cut = max(1, n // 3)
    half = (n + 1) // 2
    recomposed = np.r_[idx[:half], idx[: n - half]]
    regroupings: list[tuple[str, Callable[[], Any], np.ndarray]] = [
        ("singles", lambda: run_groups([np.array([i]) for i in singles]), singles),
        ("reversed", lambda: run_groups([idx[::-1]]), idx),
        ("split", lambda: run_groups([idx[:cut], idx[cut:]]), idx),
        # Same size, other batch-mates: the first half, then the first half again.
        (
            "recomposed",
            lambda: _first_rows(fn(variables, take(batch, recomposed)), half),
            idx[:half],
        ),
        # Larger: the batch, then its first examples again.
        (
            "enlarged",
            lambda: _first_rows(fn(variables, take(batch, np.r_[idx, idx[:cut]])), n),
            idx,
        ),
    ]

    failures: list[str] = []
    worst = 0.0
    for name, run, which in regroupings:
        try:
            got = run()
        except Exception as e:  # a model that fails on a regrouping fails the check
            failures.append(f"{name}: apply_fn raised {type(e).__name__}: {_first_line(e)}")
            continue
        for (path, ref), leaf in zip(ref_leaves, jax.tree_util.tree_leaves(got), strict=True):
            ref_np = np.asarray(ref)[which]
            got_np = np.asarray(leaf)
            diff = np.abs(got_np.astype(np.float64) - ref_np.astype(np.float64))
            if diff.size and not np.isnan(diff).all():
                worst = max(worst, float(np.nanmax(diff)))
            key = jax.tree_util.keystr(path) or "<root>"
            if fixed:
                bad = ~np.isclose(got_np, ref_np, rtol=rtol, atol=atol, equal_nan=True)
                allowed = ""
            else:
                both_nan = np.isnan(got_np.astype(np.float64)) & np.isnan(ref_np.astype(np.float64))
                bad = ~((diff <= tolerances[key]) | both_nan)
                allowed = f" (allowed {tolerances[key]:.3g})"
            if bad.any():
                examples = sorted({int(i) for i in np.nonzero(bad.reshape(bad.shape[0], -1))[0]})
                failures.append(
                    f"{name}: output {key} differs by up to {float(np.nanmax(diff)):.3g}"
                    f"{allowed} for example(s) "
                    f"{[int(which[i]) for i in examples[:5]]}{' ...' if len(examples) > 5 else ''}"
                )
    report = EvalCheckReport(
        ok=not failures,
        failures=tuple(failures),
        max_abs_diff=worst,
        tolerances=MappingProxyType(tolerances),
        rule=rule,
    )
    if failures and raise_on_failure:
        raise EvalTrapError(
            "check_batch_independence: eval-mode outputs depend on how examples are "
            "batched:\n  "
            + "\n  ".join(failures)
            + "\nA BatchNorm probably runs in training mode (batch statistics) or without "
            "running statistics: call it with train=False and its running statistics."
        )
    return report


def _rounding_tolerances(
    fn: Callable[[Any, Any], Any], variables: Any, batch: Any, ref_leaves: list, factor: float
) -> tuple[dict[str, float], str]:
    """Per output, the allowed |diff|: `factor` x its float32 rounding, measured in float64."""
    wide = _float64_run(fn, variables, batch)
    wide_leaves = None if wide is None else jax.tree_util.tree_leaves(wide)
    if wide_leaves is not None and len(wide_leaves) != len(ref_leaves):
        wide_leaves = None
    tolerances, measured, estimated = {}, 0, 0
    for i, (path, leaf) in enumerate(ref_leaves):
        key = jax.tree_util.keystr(path) or "<root>"
        x = np.asarray(leaf)
        if x.dtype.kind != "f":
            tolerances[key] = 0.0
            continue
        eps = float(np.finfo(x.dtype).eps)
        scale = float(np.nanmax(np.abs(x), initial=0.0))
        w = None if wide_leaves is None else np.asarray(wide_leaves[i])
        if w is not None and w.dtype == np.float64 and x.dtype != np.float64:
            with np.errstate(invalid="ignore"):
                rounding = float(np.nanmax(np.abs(x.astype(np.float64) - w), initial=0.0))
            tolerances[key] = factor * rounding + FLOOR_ULPS * eps * scale
            measured += 1
        else:
            tolerances[key] = FALLBACK_ULPS * eps * scale
            estimated += 1
    parts = []
    if measured:
        parts.append(f"{factor:g} x float32 rounding measured in float64 + {FLOOR_ULPS:g} ulps")
    if estimated:
        parts.append(f"{FALLBACK_ULPS:g} ulps of the largest output (no float64 run)")
    return tolerances, "; ".join(parts)


def _float64_run(fn: Callable[[Any, Any], Any], variables: Any, batch: Any) -> Any:
    """The model on the whole batch with floating variables and inputs in float64, or None."""

    def widen(a: Any) -> Any:
        dtype = getattr(a, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return a
        return jnp.asarray(a, jnp.float64)

    try:
        with jax.enable_x64(True):
            out = fn(jax.tree_util.tree_map(widen, variables), jax.tree_util.tree_map(widen, batch))
            return jax.tree_util.tree_map(np.asarray, out)
    except Exception:  # a model that cannot run in float64 gets the estimate
        return None


def _as_apply_fn(model: Any, args: tuple[Any, ...], call_kwargs: dict[str, Any]):
    """`(apply_fn(variables, batch), variables, batch)` for any kind of model."""
    kind = model_kind(model, "check_batch_independence")
    if kind == "functional" and len(args) == 3 and not call_kwargs:
        params, batch_stats, batch = args

        def forward(variables: Any, b: Any) -> Any:
            return model(variables[0], variables[1], b, functional.apply)[0]

        return forward, (params, batch_stats), batch
    if kind == "functional" and len(args) == 2 and not call_kwargs:
        deprecation.warn(
            "check_batch_independence(fn, variables, batch) with fn(variables, batch)",
            "check_batch_independence(apply_fn, params, batch_stats, batch) with "
            "apply_fn(params, batch_stats, batch, bn) -> (outputs, new_batch_stats)",
            stacklevel=4,
        )
        return model, args[0], args[1]
    want = 1 if kind == "nnx" else 2
    if len(args) != want or (kind == "functional" and call_kwargs):
        usage = {
            "functional": "check_batch_independence(apply_fn, params, batch_stats, batch)",
            "linen": "check_batch_independence(module, variables, batch, train=False)",
            "nnx": "check_batch_independence(model, batch)",
        }[kind]
        raise ValueError(f"check_batch_independence: a {kind} model is checked as {usage}.")
    if kind == "linen":
        kwargs = call_kwargs or {"train": False}
        return (lambda v, b: model.apply(v, b, **kwargs)), args[0], args[1]
    from flax import nnx

    graphdef, state = nnx.split(model)
    return (lambda s, b: nnx.merge(graphdef, s)(b, **call_kwargs)), state, args[0]


def _batch_size(batch: Any) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError("check_batch_independence: `batch` has no arrays.")
    sizes = {
        jax.tree_util.keystr(p) or "<root>": (np.shape(x)[:1] or (None,))[0] for p, x in leaves
    }
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            "check_batch_independence: every leaf of `batch` needs the same leading batch "
            f"size, got {sizes}."
        )
    n = next(iter(sizes.values()))
    if n < 2:
        raise ValueError(
            f"check_batch_independence: `batch` needs at least 2 examples to regroup, got {n}."
        )
    return n


def _first_rows(tree: Any, n: int) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], tree)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
