"""Where bnjax's compile time goes: HLO sizes, and compile time of variants of `_fused`.

Usage (from the repository root):

    python benchmarks/compile_cost.py --hlo               # deterministic: op counts only
    python benchmarks/compile_cost.py --rounds 3          # + paired compile-time ratios
    python benchmarks/compile_cost.py --model resnet18    # the same on the whole model
    python benchmarks/compile_cost.py --model resnet50 --rounds 5 --run 11 \
        --variants "shipped,guard (lax.cond) only"

Two kinds of measure:

* Deterministic (`--hlo`): for one training forward, one training forward+backward and
  (with `--model`) a whole training step, the size of the jaxpr, of the lowered
  StableHLO and of XLA's optimized HLO (characters, fusions, conditionals,
  computations), which do not depend on the machine's load.
* Compile time (trace + lower + compile of a fresh closure, wall clock) of each
  variant of `bnjax._fused` and of flax.linen, interleaved in rounds; reported as the
  median of the per-round ratio to flax.linen (a loaded machine scales both).

The variants patch `bnjax._fused` for the duration of one compile; `shipped` is the
code as it is. The ones marked `(unsafe)` drop the large-mean precision and are
bounds, not candidates.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from _common import paired_median, pin_malloc

pin_malloc()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import bnjax  # noqa: E402
from bnjax._core import functional as _core  # noqa: E402
from bnjax._core import fused as _fused  # noqa: E402
from bnjax._core import stats as _stats  # noqa: E402

# ------------------------------------------------------------------------ variants


def _raw_only(x, reduce_axes, n):
    """(unsafe) E[x], E[x^2] - E[x]^2 without the guard: flax.linen's numerics."""
    dtype = _stats.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    mean = jnp.sum(xf, reduce_axes) / n
    var = jnp.sum(xf * xf, reduce_axes) / n - mean * mean
    return mean, jnp.maximum(var, 0)


# The code before this benchmark's changes (commit 3d65c66), rebuilt on today's helpers:
# on CPU the raw sums checked by a `lax.cond` that recomputes them shifted when some
# mean^2 > 4 var, and every CPU/GPU choice a `lax.platform_dependent`.


def _pd_copies(v, k):
    return lax.platform_dependent(
        v, cpu=lambda v: lax.optimization_barrier((v,) * k), default=lambda v: (v,) * k
    )


def _guarded_raw_moments(x, reduce_axes, n):
    dtype = _stats.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    mean = jnp.sum(xf, reduce_axes) / n
    var = jnp.sum(xf * xf, reduce_axes) / n - mean * mean
    ok = jnp.max(mean * mean - 4.0 * var) <= 0
    return lax.cond(
        ok,
        lambda x, mean, var: (mean, jnp.maximum(var, 0)),
        lambda x, mean, var: _fused._shifted_moments(x, lax.stop_gradient(mean), reduce_axes, n),
        x,
        mean,
        var,
    )


def _pd_moments(x, reduce_axes, n):
    def shifted(x):
        shift = _stats.sample_shift(x, reduce_axes, None).astype(_stats.stats_dtype(x.dtype))
        return _fused._shifted_moments(x, lax.stop_gradient(shift), reduce_axes, n)

    return lax.platform_dependent(
        x, cpu=lambda x: _guarded_raw_moments(x, reduce_axes, n), default=shifted
    )


@contextlib.contextmanager
def _patched(**attrs: Any) -> Iterator[None]:
    """`bnjax._fused` with some of its functions replaced, for one compile."""
    old = {k: getattr(_fused, k) for k in attrs}
    for k, v in attrs.items():
        setattr(_fused, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(_fused, k, v)


def _moments_with(fn: Callable) -> Callable:
    def moments(x, reduce_axes):
        n = 1
        for a in reduce_axes:
            n *= x.shape[a]
        return fn(x, reduce_axes, n)

    return moments


def _autodiff_apply(params, batch_stats, x, train, **kw):
    """bnjax.apply with the fused forward but JAX's autodiff (no custom_jvp)."""
    del train, kw
    reduce_axes = tuple(range(x.ndim - 1))
    mean, var = _fused._moments(x, reduce_axes)
    _, a = _stats.fold_scale(var, params.get("weight"), 1e-5)
    y = _stats.affine(x, mean, a, params.get("bias"), reduce_axes)
    m = _stats.Moments(mean=mean, var=var, count=x.size // x.shape[-1])
    return y, _core.update_stats(batch_stats, m, momentum=0.1)


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "shipped": contextlib.nullcontext,
    "before: guard + platform_dependent": lambda: _patched(
        _copies=_pd_copies, _moments=_moments_with(_pd_moments)
    ),
    "guard (lax.cond) only": lambda: _patched(_moments=_moments_with(_guarded_raw_moments)),
    "raw without guard (unsafe)": lambda: _patched(_moments=_moments_with(_raw_only)),
    "no CPU barriers": lambda: _patched(_on_cpu=lambda: False),
}


# ---------------------------------------------------------------------- workloads


def bn_workload(
    kind: str, shape: tuple[int, ...], impl: str, dtype: str = "float32"
) -> tuple[Callable, tuple]:
    """A per-op workload: `train_fwd` or `train_fwd_bwd`, for bnjax or flax.linen."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(0.5 + 2 * rng.standard_normal(shape, np.float32), dtype)
    g = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    c = shape[-1]
    if impl == "flax.linen":
        m = nn.BatchNorm(momentum=0.9, dtype=dtype)
        v = m.init(jax.random.key(0), x, use_running_average=False)
        p, s = v["params"], v["batch_stats"]

        def f(p, x):
            y, upd = m.apply(
                {"params": p, "batch_stats": s},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return y, upd["batch_stats"]
    else:
        p, s = bnjax.init(c)
        apply = _autodiff_apply if impl == "autodiff" else bnjax.apply

        def f(p, x):
            return apply(p, s, x, True, momentum=0.1)

    if kind == "train_fwd":
        return f, (p, x)

    def fb(p, x, g):
        y, vjp, aux = jax.vjp(f, p, x, has_aux=True)
        return y, aux, vjp(g)

    return fb, (p, x, g)


def model_workload(model: str, impl: str, quick: bool) -> tuple[Callable, tuple]:
    """A whole training step of a `benchmarks/models.py` model (float32)."""
    import models  # benchmarks/models.py

    cfg = models.configs(quick)[model]
    impls = models.build(cfg, jnp.dtype("float32"), control=False)
    im = next(
        i for i in impls if i.name == ("flax.linen" if impl == "flax.linen" else "bnjax.linen")
    )
    return im.train, (*im.state, im.batch)


# ------------------------------------------------------------------------ measures


def _python_calls(fn: Callable, args: tuple) -> int:
    """Python function calls made while tracing `fn` (a load-independent trace cost)."""
    jax.make_jaxpr(lambda *a: fn(*a))(*args)  # warm JAX's own caches first
    calls = [0]

    def count(frame, event, arg):
        del frame, arg
        if event == "call":
            calls[0] += 1

    sys.setprofile(count)
    try:
        jax.make_jaxpr(lambda *a: fn(*a))(*args)
    finally:
        sys.setprofile(None)
    return calls[0]


def hlo_stats(fn: Callable, args: tuple) -> dict[str, int]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    lowered = jax.jit(fn).lower(*args)
    text = lowered.as_text()
    hlo = lowered.compile().as_text()
    entry = hlo[hlo.rfind("ENTRY") :]

    def count_eqns(j) -> int:
        n = 0
        for e in j.eqns:
            n += 1
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                n += count_eqns(sub)
        return n

    return {
        "trace python calls": _python_calls(fn, args),
        "jaxpr eqns": count_eqns(jaxpr.jaxpr),
        "stablehlo chars": len(text),
        "stablehlo case": text.count("stablehlo.case"),
        "hlo chars": len(hlo),
        "hlo computations": hlo.count("\n%") + 1,
        "entry fusions": entry.count(" fusion("),
        "conditionals": hlo.count(" conditional("),
    }


def compile_once(fn: Callable, args: tuple) -> tuple[Any, dict[str, float]]:
    """Compiled `fn` and the wall time of tracing alone, trace + lower, and compile."""
    t0 = time.perf_counter()
    jax.make_jaxpr(lambda *a: fn(*a))(*args)
    t1 = time.perf_counter()
    lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return compiled, {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "total": t3 - t1}


def run_rounds(calls: dict[Any, Callable[[], Any]], rounds: int, target_s: float) -> dict:
    """Per-call seconds of each callable, `rounds` interleaved rounds of ~`target_s`."""
    reps = {}
    for key, call in calls.items():
        for _ in range(2):
            jax.block_until_ready(call())
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        reps[key] = max(1, min(200, int(target_s / max(time.perf_counter() - t0, 1e-6))))
    times: dict[Any, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for i in range(rounds):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            for _ in range(reps[key]):
                jax.block_until_ready(calls[key]())
            times[key].append((time.perf_counter() - t0) / reps[key])
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hlo", action="store_true", help="op counts only (no timing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="resnet18, resnet50: a whole training step")
    ap.add_argument("--quick", action="store_true", help="with --model: the quick size")
    ap.add_argument("--shape", default="16,16,16,64")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kinds", default="train_fwd,train_fwd_bwd")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--run", type=int, default=0, help="also time the calls: this many rounds")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]

    def workloads() -> list[tuple[str, str, str]]:
        if args.model:
            return [(args.model, v, "bnjax") for v in variants] + [(args.model, "", "flax.linen")]
        out = []
        for kind in args.kinds.split(","):
            out += [(kind, v, "bnjax") for v in variants]
            if kind == "train_fwd_bwd":
                out.append((kind, "shipped", "autodiff"))
            out.append((kind, "", "flax.linen"))
        return out

    def make(kind: str, impl: str) -> tuple[Callable, tuple]:
        if args.model:
            return model_workload(args.model, impl, args.quick)
        return bn_workload(kind, shape, impl, args.dtype)

    rows = workloads()
    print(f"jax {jax.__version__}; shape {shape} {args.dtype}; {' '.join(sys.argv[1:])}")
    if args.hlo:
        for kind, v, impl in rows:
            fn, a = make(kind, impl)
            with VARIANTS.get(v, contextlib.nullcontext)():
                st = hlo_stats(fn, a)
            print(f"{kind:14s} {impl:10s} {v:34s} " + ", ".join(f"{k} {n}" for k, n in st.items()))
        return

    times: dict[tuple[str, str, str], list[dict[str, float]]] = {r: [] for r in rows}
    built = {r: make(r[0], r[2]) for r in rows}
    compiled = {}
    for r in rows:  # one warm-up compile each: first-use costs fall on nobody
        with VARIANTS.get(r[1], contextlib.nullcontext)():
            compiled[r], _ = compile_once(*built[r])
    for i in range(args.rounds):
        order = rows[i % len(rows) :] + rows[: i % len(rows)]
        for r in order:
            with VARIANTS.get(r[1], contextlib.nullcontext)():
                times[r].append(compile_once(*built[r])[1])
    run = {}
    if args.run:
        calls = {r: functools.partial(compiled[r], *built[r][1]) for r in rows}
        run = run_rounds(calls, args.run, 0.1 if args.model else 0.03)
    for kind, v, impl in rows:
        ref = times[(kind, "", "flax.linen")]
        mine = times[(kind, v, impl)]
        med = {k: statistics.median(t[k] for t in mine) for k in ("trace", "lower", "compile")}
        ratio = paired_median([t["total"] for t in mine], [t["total"] for t in ref])
        tr = paired_median([t["trace"] for t in mine], [t["trace"] for t in ref])
        print(
            f"{kind:14s} {impl:10s} {v:34s} trace {med['trace']:.3f}s lower {med['lower']:.3f}s "
            f"compile {med['compile']:.3f}s | lower+compile x flax.linen {ratio:.2f} "
            f"(trace x{tr:.2f})"
            + (
                f" | run {statistics.median(run[(kind, v, impl)]) * 1e3:.3f} ms, x flax.linen "
                f"{paired_median(run[(kind, v, impl)], run[(kind, '', 'flax.linen')]):.3f}"
                if run
                else ""
            )
        )


if __name__ == "__main__":
    main()
