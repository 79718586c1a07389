"""What a reduction costs on XLA:CPU: the measurements behind bnjax's CPU fast path.

Usage (from the repository root):

    python benchmarks/cpu_reductions.py            # prints, writes benchmarks/cpu_reductions.md
    python benchmarks/cpu_reductions.py --quick    # fewer rounds, prints only

BatchNorm's training forward needs two per-feature sums over `x` (of `x` and of
`x^2`, or shifted versions of them); its backward needs two more (of `g` and of
`(x - mean) * g`). How close bnjax gets to the memory-traffic floor on CPU depends
on how XLA:CPU runs those sums, so this script times them directly, on the
benchmark's (64, 32, 32, 64) float32 channels-last tensor, in one process with
interleaved rounds (as `bench_bn.py` does):

1. **Single reductions** as XLA:CPU (YNNPACK fusions) runs them: `sum(x)`,
   `sum(x * x)`, and the same with one or two elementwise operations in front
   (a scale, a per-feature shift, a second operand).
2. **Ways to get both moments from one sweep** over `x`: two sums (what bnjax and
   flax.linen do), a variadic `lax.reduce`, the sums of a stacked / concatenated /
   complex array, a dot with a vector of ones, chunked sums, all checked against
   the two sums.
3. **Compile time** of the raw moments alone and with bnjax's large-mean guard (a
   `lax.cond`) with a trivial or a real fallback branch.

Each row gives the median over rounds of the per-call time and its ratio to one
`sum(x)` measured in the same round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from _common import paired_median, pin_malloc

pin_malloc()  # before JAX allocates anything

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

SHAPE = (64, 32, 32, 64)
AX = (0, 1, 2)
C = SHAPE[-1]
N = int(np.prod(SHAPE[:-1]))


def _pair(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    return s[..., 0], s[..., 1]


SINGLE: dict[str, Callable] = {
    "sum(x)": lambda x, g, m: jnp.sum(x, AX),
    "sum(x * x)": lambda x, g, m: jnp.sum(x * x, AX),
    "sum(x * 2)": lambda x, g, m: jnp.sum(x * 2, AX),
    "sum((x - m)^2), m per feature": lambda x, g, m: jnp.sum(jnp.square(x - m), AX),
    "sum(g)": lambda x, g, m: jnp.sum(g, AX),
    "sum(x * g)": lambda x, g, m: jnp.sum(x * g, AX),
    "sum((x - m) * g)": lambda x, g, m: jnp.sum((x - m) * g, AX),
}


def _stack_minor(x):
    return _pair(jnp.sum(jnp.stack([x, x * x], -1), AX))


def _concat_channels(x):
    s = jnp.sum(jnp.concatenate([x, x * x], -1), AX)
    return s[:C], s[C:]


def _complex(x):
    s = jnp.sum(lax.complex(x, x * x), AX)
    return s.real, s.imag


def _variadic(x):
    x2 = x.reshape(N, C)
    return lax.reduce(
        (x2, x2 * x2),
        (np.float32(0), np.float32(0)),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        (0,),
    )


def _dot_ones(x):
    x2 = x.reshape(N, C)
    ones = jnp.ones((N,), x.dtype)
    return ones @ x2, ones @ (x2 * x2)


def _scan_chunks(x):
    def body(c, xi):
        return (c[0] + jnp.sum(xi, 0), c[1] + jnp.sum(xi * xi, 0)), None

    z = jnp.zeros((C,), x.dtype)
    return lax.scan(body, (z, z), x.reshape(8, -1, C))[0]


BOTH: dict[str, Callable] = {
    "two sums: sum(x), sum(x * x) (bnjax, flax.linen)": lambda x: (
        jnp.sum(x, AX),
        jnp.sum(x * x, AX),
    ),
    "variadic lax.reduce of (x, x * x)": _variadic,
    "sum of stack([x, x * x], -1)": _stack_minor,
    "sum of concatenate([x, x * x], channels)": _concat_channels,
    "sum of complex(x, x * x)": _complex,
    "ones @ x, ones @ (x * x)": _dot_ones,
    "scan over 8 chunks of both sums": _scan_chunks,
}


def _raw(x):
    mean = jnp.sum(x, AX) / N
    return mean, jnp.sum(x * x, AX) / N - mean * mean


def _guarded(fallback):
    def f(x):
        mean, var = _raw(x)
        ok = jnp.max(mean * mean - 4 * var) <= 0
        return lax.cond(ok, lambda x, m, v: (m, jnp.maximum(v, 0)), fallback, x, mean, var)

    return f


def _shifted_fallback(x, m, v):
    d1 = jnp.sum(x - m, AX) / N
    return m + d1, jnp.maximum(jnp.sum((x - m) ** 2, AX) / N - d1 * d1, 0)


COMPILE: dict[str, Callable] = {
    "raw moments, no guard": _raw,
    "guard, trivial fallback": _guarded(lambda x, m, v: (m, v * 2)),
    "guard, shifted fallback (bnjax)": _guarded(_shifted_fallback),
}


def _time(fns: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Per-call seconds of each function, per round, interleaved."""
    for f in fns.values():
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        keys = list(fns)
        keys = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in keys:
            t0 = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(fns[k]())
            times[k].append((time.perf_counter() - t0) / reps)
    return times


def _rows(times: dict[str, list[float]], base: str) -> list[str]:
    out = []
    for k, t in times.items():
        ratio = paired_median(t, times[base])
        out.append(f"| {k} | {statistics.median(t) * 1e3:.3f} | {ratio:.2f} |")
    return out


def _compile_once(name: str) -> float:
    """Compile time of COMPILE[name] in a fresh process (no in-process cache)."""
    code = (
        "import sys, time, jax, jax.numpy as jnp; sys.path.insert(0, 'benchmarks');"
        "import cpu_reductions as m; x = jnp.ones(m.SHAPE);"
        "jax.jit(lambda x: x * 2 + 1).lower(x).compile();"  # warm the compiler up
        f"t = time.perf_counter(); jax.jit(m.COMPILE[{name!r}]).lower(x).compile();"
        "print(time.perf_counter() - t)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds; prints only")
    args = ap.parse_args(argv)
    rounds, reps, compiles = (5, 10, 1) if args.quick else (15, 30, 3)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32) + 0.5)
    g = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    m = jnp.asarray(rng.standard_normal(C).astype(np.float32))

    single = {k: jax.jit(f).lower(x, g, m).compile() for k, f in SINGLE.items()}
    t_single = _time({k: (lambda c=c: c(x, g, m)) for k, c in single.items()}, rounds, reps)

    ref = [np.asarray(a, np.float64) for a in BOTH[next(iter(BOTH))](x)]
    both, errors = {}, {}
    for k, f in BOTH.items():
        c = jax.jit(f).lower(x).compile()
        got = c(x)
        errors[k] = max(
            float(np.max(np.abs(np.asarray(a, np.float64) - b) / (np.abs(b) + 1)))
            for a, b in zip(got, ref, strict=True)
        )
        both[k] = lambda c=c: c(x)
    t_both = _time(both | {"sum(x)": lambda: single["sum(x)"](x, g, m)}, rounds, max(reps // 3, 3))

    t_compile = {k: [_compile_once(k) for _ in range(compiles)] for k in COMPILE}

    lines = [
        "# What a reduction costs on XLA:CPU",
        "",
        f"Machine: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; jax {jax.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Command: `python benchmarks/cpu_reductions.py{' --quick' if args.quick else ''}` "
        f"({rounds} interleaved rounds; median per-call ms; ratio = median over rounds of "
        f"the per-round ratio to `sum(x)`). Tensor {SHAPE} float32, channels-last "
        f"({x.nbytes / 1e6:.1f} MB); reductions over every axis but the last.",
        "",
        "## One reduction, and what an elementwise operation in front of it costs",
        "",
        "| reduction | ms | x sum(x) |",
        "|---|---:|---:|",
        *_rows(t_single, "sum(x)"),
        "",
        "## Both moments: two sums against single-sweep formulations",
        "",
        "| formulation | ms | x sum(x) | max rel. error vs two sums |",
        "|---|---:|---:|---:|",
        *(
            row + f" {errors.get(k, 0.0):.1e} |"
            for k, row in zip(t_both, _rows(t_both, "sum(x)"), strict=True)
        ),
        "",
        "## Compile time of the moments (fresh process each, seconds)",
        "",
        "| variant | compile s (median) | runs |",
        "|---|---:|---|",
        *(
            f"| {k} | {statistics.median(v):.3f} | {', '.join(f'{t:.3f}' for t in v)} |"
            for k, v in t_compile.items()
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_reductions.md")
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
