"""BatchNorm side by side: bnjax against every peer, in one process, interleaved.

Usage (from the repository root):

    python benchmarks/bench_bn.py --quick          # < 1 min, one shape, no file
    python benchmarks/bench_bn.py                  # full run, writes benchmarks/results.md
    python benchmarks/bench_bn.py --gpu            # GPU shapes, writes results_gpu.md

Run the full CPU benchmark with a Python that has torch (e.g. /work/venv-torch) to get
the `torch.nn.functional.batch_norm` rows; without torch they are left out.

Method
------
* One process. For each (shape, workload) every implementation is compiled first
  (compile time = trace + lower + compile, wall clock, the median of 3 compiles of
  fresh closures), then timed in `--trials` round-robin rounds: in each round every
  implementation runs `reps` calls, so machine noise (other processes) hits all of
  them alike. Reported: the median over rounds of the per-call time, with the min
  and max over rounds; a ratio between two implementations is the median over rounds
  of their per-round ratio (they ran back to back, so a slow spell cancels).
* On CPU each call is synchronous (`block_until_ready`); on GPU the `reps` calls of a
  round are dispatched back to back and the round ends with one block.
* The page-fault trap: a fresh multi-MiB buffer that glibc takes from (and returns
  to) the OS costs thousands of minor page faults per call. At start-up we raise
  glibc's mmap and trim thresholds (`mallopt`) so freed buffers stay in the heap, and
  we report minor page faults per call (`getrusage`) so that what is timed is
  BatchNorm, not the kernel zeroing pages.
* Minimal-traffic model for GB/s: training forward 3 passes over x (read for the
  statistics, read again, write y), eval 2 (read x, write y), training
  forward+backward 5 (the issue's model). GB/s = passes * x.nbytes / time: an
  effective bandwidth, comparable between rows of one table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _common import load_line, paired_median, pin_malloc

MALLOPT_OK = pin_malloc()  # before JAX allocates anything

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bnjax  # noqa: E402

try:
    import flax
    import flax.linen as nn
    from flax import nnx
except ImportError:  # pragma: no cover
    flax = nn = nnx = None
try:
    import equinox as eqx
except ImportError:  # pragma: no cover
    eqx = None
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None
try:
    import bnjax.linen as bnjax_linen
except ImportError:
    bnjax_linen = None

WORKLOADS = ("train_fwd", "eval_fwd", "train_fwd_bwd")
PASSES = {"train_fwd": 3, "eval_fwd": 2, "train_fwd_bwd": 5}
MOMENTUM, EPS = 0.1, 1e-5


@dataclass
class Case:
    shape: tuple[int, ...]  # channels-last (features on the last axis)
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.shape} {self.dtype}"

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def nchw(self) -> tuple[int, ...]:
        s = self.shape
        return (s[0], s[-1], *s[1:-1])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(jnp.dtype(self.dtype)).itemsize


@dataclass
class Bench:
    """One implementation of one workload, ready to call."""

    name: str
    call: Callable[[], Any]
    compile_s: float
    times: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)
    note: str = ""
    kernels: str = "-"
    # Waits for the device: torch CUDA needs its own synchronize.
    wait: Callable[[Any], Any] = jax.block_until_ready


# ----------------------------------------------------------------------------- data


def _data(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(case.shape, np.float32) * 2 + 0.5).astype(np.float32)
    g = rng.standard_normal(case.shape, np.float32)
    return x, g


def _jax_in(a: np.ndarray, dtype: str) -> jax.Array:
    return jax.device_put(jnp.asarray(a, dtype=dtype))


COMPILES = 3  # compile time: the median of this many compiles of fresh closures


def _compile(fn: Callable, *args: Any, donate: tuple[int, ...] = ()) -> tuple[Callable, float]:
    """The compiled `fn` and its compile time (trace + lower + compile, wall clock).

    The first compile of a new shape also pays one-time costs (tracing caches, the
    compiler warming up) that would fall on whichever implementation comes first,
    so each one is compiled `COMPILES` times from a fresh closure (nothing cached)
    and the median is reported.
    """
    times = []
    for _ in range(COMPILES):
        t0 = time.perf_counter()
        compiled = jax.jit(lambda *a: fn(*a), donate_argnums=donate).lower(*args).compile()
        times.append(time.perf_counter() - t0)
    return compiled, statistics.median(times)


HLO_SUMMARY: dict[str, str] = {}


def _kernels(compiled: Any) -> str:
    """Kernel count of the optimized HLO's entry: fusions, reductions, conditionals."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - a summary only
        return "-"
    entry = text[text.rfind("ENTRY") :]
    fusions = entry.count(" fusion(")
    custom = entry.count("custom-call(")
    conds = entry.count(" conditional(")
    return f"{fusions} fusions, {custom} custom calls, {conds} conditionals"


DUMP = {"dir": None, "label": ""}  # --dump-hlo: where to write optimized HLO, and for what


def _jax_bench(name: str, fn: Callable, args: tuple, note: str = "") -> Bench:
    compiled, ct = _compile(fn, *args)
    HLO_SUMMARY[name] = _kernels(compiled)
    if DUMP["dir"] and name in ("bnjax.apply", "flax.linen.BatchNorm"):
        fname = f"{name.split('.')[0]}_{DUMP['label']}.txt".replace(" ", "")
        with open(os.path.join(DUMP["dir"], fname), "w") as f:
            f.write(compiled.as_text())
    return Bench(name, lambda: compiled(*args), ct, note=note)


def _fwd_bwd(f: Callable, diff: tuple, g: jax.Array) -> tuple:
    """y, aux (new stats) and the vjp of y w.r.t. `diff` for upstream gradient g."""
    y, vjp, aux = jax.vjp(f, *diff, has_aux=True)
    return y, aux, vjp(g)


# --------------------------------------------------------------------- implementations


def make_bnjax(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench:
    params, stats = bnjax.init(case.channels)
    xj, gj = _jax_in(x, case.dtype), _jax_in(g, case.dtype)
    if workload == "train_fwd":
        return _jax_bench(
            "bnjax.apply",
            lambda p, s, x: bnjax.apply(p, s, x, True, momentum=MOMENTUM, eps=EPS),
            (params, stats, xj),
        )
    if workload == "eval_fwd":
        return _jax_bench(
            "bnjax.apply",
            lambda p, s, x: bnjax.apply(p, s, x, False, momentum=MOMENTUM, eps=EPS)[0],
            (params, stats, xj),
        )

    def step(p, s, x, g):
        return _fwd_bwd(lambda p, x: bnjax.apply(p, s, x, True, momentum=MOMENTUM), (p, x), g)

    return _jax_bench("bnjax.apply", step, (params, stats, xj, gj))


def make_bnjax_linen(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench | None:
    if bnjax_linen is None or not hasattr(bnjax_linen, "BatchNorm"):
        return None
    try:
        module = bnjax_linen.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    except TypeError:
        module = bnjax_linen.BatchNorm()
    return _linen_bench("bnjax.linen.BatchNorm", module, case, workload, x, g)


def _linen_bench(
    name: str, module: Any, case: Case, workload: str, x: np.ndarray, g: np.ndarray
) -> Bench:
    xj, gj = _jax_in(x, case.dtype), _jax_in(g, case.dtype)
    variables = module.init(jax.random.key(0), xj, use_running_average=False)
    params, stats = variables["params"], variables["batch_stats"]

    def fwd(p, s, x, train):
        y, upd = module.apply(
            {"params": p, "batch_stats": s},
            x,
            use_running_average=not train,
            mutable=["batch_stats"],
        )
        return y.astype(x.dtype), upd["batch_stats"]

    if workload == "train_fwd":
        return _jax_bench(name, lambda p, s, x: fwd(p, s, x, True), (params, stats, xj))
    if workload == "eval_fwd":
        return _jax_bench(name, lambda p, s, x: fwd(p, s, x, False)[0], (params, stats, xj))

    def step(p, s, x, g):
        return _fwd_bwd(lambda p, x: fwd(p, s, x, True), (p, x), g)

    return _jax_bench(name, step, (params, stats, xj, gj))


def make_flax_linen(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench | None:
    if nn is None:
        return None
    module = nn.BatchNorm(momentum=1 - MOMENTUM, epsilon=EPS, dtype=jnp.dtype(case.dtype))
    return _linen_bench("flax.linen.BatchNorm", module, case, workload, x, g)


def make_flax_nnx(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench | None:
    if nnx is None:
        return None
    bn = nnx.BatchNorm(
        case.channels,
        momentum=1 - MOMENTUM,
        epsilon=EPS,
        dtype=jnp.dtype(case.dtype),
        rngs=nnx.Rngs(0),
    )
    graphdef, params, rest = nnx.split(bn, nnx.Param, ...)
    xj, gj = _jax_in(x, case.dtype), _jax_in(g, case.dtype)

    def fwd(p, r, x, train):
        m = nnx.merge(graphdef, p, r)
        y = m(x, use_running_average=not train)
        return y.astype(x.dtype), nnx.state(m, nnx.BatchStat)

    name = "flax.nnx.BatchNorm"
    if workload == "train_fwd":
        return _jax_bench(name, lambda p, r, x: fwd(p, r, x, True), (params, rest, xj))
    if workload == "eval_fwd":
        return _jax_bench(name, lambda p, r, x: fwd(p, r, x, False)[0], (params, rest, xj))

    def step(p, r, x, g):
        # nnx refuses variables from an outer trace, so r goes through the vjp too.
        y, new_stats, (dp, _, dx) = _fwd_bwd(lambda p, r, x: fwd(p, r, x, True), (p, r, x), g)
        return y, new_stats, (dp, dx)

    return _jax_bench(name, step, (params, rest, xj, gj))


def make_equinox(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench | None:
    if eqx is None:
        return None
    # Equinox normalizes one example at a time, channels first, under vmap.
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        case.channels, axis_name="batch", mode="batch", momentum=1 - MOMENTUM, eps=EPS
    )
    xt, gt = np.moveaxis(x, -1, 1).copy(), np.moveaxis(g, -1, 1).copy()
    xj, gj = _jax_in(xt, case.dtype), _jax_in(gt, case.dtype)
    w, b = model.weight, model.bias

    def fwd(w, b, s, x, train):
        m = eqx.tree_at(lambda m: (m.weight, m.bias), model, (w, b))
        m = eqx.nn.inference_mode(m, not train)
        y, s = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)
        return y.astype(x.dtype), s

    name, note = "equinox.nn.BatchNorm", "NCHW"
    if workload == "train_fwd":
        return _jax_bench(name, lambda w, b, s, x: fwd(w, b, s, x, True), (w, b, state, xj), note)
    if workload == "eval_fwd":
        return _jax_bench(
            name, lambda w, b, s, x: fwd(w, b, s, x, False)[0], (w, b, state, xj), note
        )

    def step(w, b, s, x, g):
        return _fwd_bwd(lambda w, b, x: fwd(w, b, s, x, True), (w, b, x), g)

    return _jax_bench(name, step, (w, b, state, xj, gj), note)


def _torch_bench(
    case: Case, workload: str, x: np.ndarray, g: np.ndarray, channels_last: bool, device: str
) -> Bench | None:
    if torch is None or len(case.shape) < 2:
        return None
    if channels_last and len(case.shape) != 4:
        return None
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).to(device=device, dtype=tdtype)
    gt = torch.from_numpy(np.moveaxis(g, -1, 1).copy()).to(device=device, dtype=tdtype)
    if channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
        gt = gt.contiguous(memory_format=torch.channels_last)
    c = case.channels
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

    if workload == "train_fwd":

        def call():
            with torch.no_grad():
                y = F.batch_norm(xt, rm, rv, w, b, True, MOMENTUM, EPS)
            return y

    elif workload == "eval_fwd":

        def call():
            with torch.no_grad():
                y = F.batch_norm(xt, rm, rv, w, b, False, MOMENTUM, EPS)
            return y

    else:
        xr = xt.detach().requires_grad_(True)

        def call():
            y = F.batch_norm(xr, rm, rv, w, b, True, MOMENTUM, EPS)
            grads = torch.autograd.grad(y, (xr, w, b), gt)
            return y, grads

    wait = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda out: out)
    t0 = time.perf_counter()
    try:
        wait(call())
    except RuntimeError as e:  # e.g. a dtype combination this torch build lacks
        print(f"  torch skipped: {e}", file=sys.stderr)
        return None
    ct = time.perf_counter() - t0
    name = f"torch F.batch_norm ({device})"
    note = "channels_last" if channels_last else "NCHW"
    return Bench(name + (" CL" if channels_last else ""), call, ct, note=note, wait=wait)


def make_torch(case, workload, x, g, device="cpu"):
    return _torch_bench(case, workload, x, g, False, device)


def make_torch_cl(case, workload, x, g, device="cpu"):
    return _torch_bench(case, workload, x, g, True, device)


def make_floor_inplace(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench:
    """x <- -x on a donated buffer: one read, one write, no allocation.

    (A factor like 1.0000001 rounds to 1 in bfloat16 and XLA drops the whole op.)
    """
    del workload, g
    state = {"x": _jax_in(x, case.dtype)}
    compiled, ct = _compile(lambda x: x * jnp.asarray(-1, x.dtype), state["x"], donate=(0,))

    def call():
        state["x"] = compiled(state["x"])
        return state["x"]

    return Bench("floor: in-place -x (donated)", call, ct, note="2 passes")


def make_floor_affine(case: Case, workload: str, x: np.ndarray, g: np.ndarray) -> Bench:
    """Per-channel x * a + b into a fresh buffer: eval's minimal work."""
    del workload, g
    xj = _jax_in(x, case.dtype)
    a = jnp.full((case.channels,), 1.5, jnp.float32)
    b = jnp.full((case.channels,), 0.5, jnp.float32)
    return _jax_bench(
        "floor: x*a+b per channel",
        lambda x, a, b: (x.astype(jnp.float32) * a + b).astype(x.dtype),
        (xj, a, b),
        note="2 passes",
    )


PEERS = [
    ("bnjax", make_bnjax),
    ("bnjax.linen", make_bnjax_linen),
    ("flax.linen", make_flax_linen),
    ("flax.nnx", make_flax_nnx),
    ("equinox", make_equinox),
    ("torch", make_torch),
    ("torch_cl", make_torch_cl),
]
FLOORS = [("floor_inplace", make_floor_inplace), ("floor_affine", make_floor_affine)]


# ----------------------------------------------------------------------------- timing


def _calibrate(bench: Bench, target_s: float) -> int:
    t0 = time.perf_counter()
    bench.wait(bench.call())
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(200, int(target_s / dt)))


def run_case(
    case: Case,
    workload: str,
    impls: list,
    trials: int,
    target_s: float,
    sync_each: bool,
    torch_device: str,
) -> list[Bench]:
    x, g = _data(case)
    DUMP["label"] = f"{workload}_{'x'.join(map(str, case.shape))}_{case.dtype}"
    benches: list[Bench] = []
    for key, make in impls:
        try:
            if key.startswith("torch"):
                b = make(case, workload, x, g, device=torch_device)
            else:
                b = make(case, workload, x, g)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            print(f"  {key}: failed ({type(e).__name__}: {e})", file=sys.stderr)
            b = None
        if b is not None:
            benches.append(b)
    # Warm up (page in, fill the allocator's free lists) and size the rounds.
    reps = {}
    for b in benches:
        for _ in range(2):
            b.wait(b.call())
        reps[b.name] = _calibrate(b, target_s)
    for trial in range(trials):
        order = benches[trial % len(benches) :] + benches[: trial % len(benches)]
        for b in order:
            n = reps[b.name]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            if sync_each:
                for _ in range(n):
                    b.wait(b.call())
            else:
                out = None
                for _ in range(n):
                    out = b.call()
                b.wait(out)
            dt = time.perf_counter() - t0
            f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            b.times.append(dt / n)
            b.faults.append((f1 - f0) / n)
    for b in benches:
        b.kernels = HLO_SUMMARY.pop(b.name, "-")
    return benches


# ---------------------------------------------------------------------------- reports


def _versions() -> str:
    parts = [f"jax {jax.__version__}"]
    if flax is not None:
        parts.append(f"flax {flax.__version__}")
    if eqx is not None:
        parts.append(f"equinox {eqx.__version__}")
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    parts.append(f"numpy {np.__version__}")
    return ", ".join(parts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    dev = jax.devices()[0]
    accel = "" if dev.platform == "cpu" else f", device {dev.device_kind}"
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores{accel}; Python {platform.python_version()}; "
        f"{_versions()}; mallopt pinned: {MALLOPT_OK}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )


REF = "flax.linen.BatchNorm"
FLOOR = "floor: x*a+b per channel"


def paired_ratio(b: Bench, ref: Bench | None) -> float:
    """`b`'s per-round paired ratio to `ref` (`_common.paired_median`); NaN without ref."""
    return paired_median(b.times, ref.times) if ref is not None else float("nan")


def _find(benches: list[Bench], name: str) -> Bench | None:
    return next((b for b in benches if b.name == name), None)


def table(case: Case, workload: str, benches: list[Bench]) -> str:
    ref = _find(benches, REF)
    passes = PASSES[workload]
    lines = [
        f"#### {workload}, {case.label} ({passes} passes = {passes * case.nbytes / 1e6:.1f} MB)",
        "",
        "| implementation | ms (median) | [min, max] | x flax.linen | GB/s | compile s "
        "| faults/call | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for b in benches:
        med = statistics.median(b.times) * 1e3
        lo, hi = min(b.times) * 1e3, max(b.times) * 1e3
        p = 2 if b.name.startswith("floor") else passes
        gbs = p * case.nbytes / (med * 1e-3) / 1e9
        lines.append(
            f"| {b.name} | {med:.3f} | [{lo:.3f}, {hi:.3f}] | {paired_ratio(b, ref):.2f} "
            f"| {gbs:.1f} | {b.compile_s:.2f} | {statistics.median(b.faults):.0f} | {b.note} |"
        )
    return "\n".join(lines)


def summary(results: dict) -> str:
    """One compact line per (case, workload): bnjax's ratio to flax.linen and floors."""
    lines = [
        "| case | workload | bnjax ms | flax.linen ms | bnjax / flax.linen "
        "| bnjax / x*a+b floor | best peer |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    nan = float("nan")
    for (label, workload), benches in results.items():
        med = {b.name: statistics.median(b.times) * 1e3 for b in benches}
        bj = _find(benches, "bnjax.apply")
        peers = {k: v for k, v in med.items() if not k.startswith(("bnjax", "floor"))}
        best = min(peers, key=peers.get) if peers else "-"
        if bj is None:
            continue
        lines.append(
            f"| {label} | {workload} | {med['bnjax.apply']:.3f} | {med.get(REF, nan):.3f} "
            f"| {paired_ratio(bj, _find(benches, REF)):.2f} "
            f"| {paired_ratio(bj, _find(benches, FLOOR)):.2f} "
            f"| {best} ({peers.get(best, nan):.3f}) |"
        )
    return "\n".join(lines)


# The targets (CPU): (case label, or "conv float32" for both conv shapes, workload,
# peer, bound).
TARGETS = [
    ("conv float32", "train_fwd_bwd", REF, 0.6),
    ("conv float32", "train_fwd", REF, 0.8),
    ("conv float32", "eval_fwd", REF, 1.0),
    ("conv float32", "eval_fwd", FLOOR, 1.1),
    ("(64, 32, 32, 64) bfloat16", "train_fwd_bwd", REF, 0.5),
    ("(64, 32, 32, 64) bfloat16", "train_fwd_bwd", "torch F.batch_norm (cpu)", 1.0),
    ("(64, 32, 32, 64) bfloat16", "train_fwd_bwd", "torch F.batch_norm (cpu) CL", 1.0),
    ("(256, 1024) float32", "train_fwd", REF, 1.0),
    ("(256, 1024) float32", "eval_fwd", REF, 1.0),
    ("(256, 1024) float32", "train_fwd_bwd", REF, 1.0),
]


def targets(results: dict) -> str:
    """The issue's targets against this run: paired ratios, and compile times."""
    conv_f32 = {c.label for c in CPU_CASES if len(c.shape) == 4 and c.dtype == "float32"}
    lines = []
    for case, workload, peer, bound in TARGETS:
        labels = conv_f32 if case == "conv float32" else {case}
        for (label, w), benches in results.items():
            if w != workload or label not in labels:
                continue
            bj, ref = _find(benches, "bnjax.apply"), _find(benches, peer)
            if bj is None or ref is None:
                continue
            r = paired_ratio(bj, ref)
            verdict = "MET" if r <= bound else "missed"
            lines.append(f"{w} {label}: {r:.2f}x {peer} (target <= {bound}) {verdict}")
    for (label, w), benches in results.items():
        bj, ref = _find(benches, "bnjax.apply"), _find(benches, REF)
        if bj is not None and ref is not None:
            verdict = "MET" if bj.compile_s <= ref.compile_s else "missed"
            lines.append(
                f"compile {label} {w}: bnjax {bj.compile_s:.2f}s, flax.linen "
                f"{ref.compile_s:.2f}s {verdict}"
            )
    return "\n".join(lines)


CPU_CASES = [
    Case((64, 32, 32, 64), "float32"),
    Case((32, 56, 56, 64), "float32"),
    Case((256, 1024), "float32"),
    Case((64, 32, 32, 64), "bfloat16"),
]
GPU_CASES = CPU_CASES + [
    Case((256, 56, 56, 64), "float32"),
    Case((256, 56, 56, 64), "bfloat16"),
    Case((256, 28, 28, 256), "float32"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, few rounds, no file")
    ap.add_argument("--gpu", action="store_true", help="GPU shapes; writes results_gpu.md")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--target-ms", type=float, default=None, help="time per round per impl")
    ap.add_argument("--only", default="", help="comma-separated impl keys (e.g. bnjax,flax.linen)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--cases", default="", help="indices into the case list, e.g. 0,3")
    ap.add_argument("--out", default=None, help="results file (default by mode)")
    ap.add_argument("--kernels", action="store_true", help="print each one's kernel count")
    ap.add_argument("--dump-hlo", default=None, help="folder for bnjax/flax optimized HLO")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    DUMP["dir"] = args.dump_hlo
    cases = GPU_CASES if args.gpu else CPU_CASES
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    elif args.quick:
        cases = cases[:1]
    trials = args.trials or (5 if args.quick else 21)
    target_s = (args.target_ms or (15 if args.quick else 30)) / 1e3
    impls = PEERS + FLOORS
    if args.only:
        keep = set(args.only.split(","))
        impls = [(k, m) for k, m in impls if k in keep]
    torch_device = "cpu"
    if backend == "gpu" and torch is not None and torch.cuda.is_available():
        torch_device = "cuda"
    if backend != "cpu" and torch_device == "cpu":
        impls = [(k, m) for k, m in impls if not k.startswith("torch")]
    if torch is not None and torch_device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    print(machine_line(), flush=True)
    start = load_line()
    results: dict = {}
    t_start = time.perf_counter()
    for case in cases:
        for workload in args.workloads.split(","):
            benches = run_case(
                case, workload, impls, trials, target_s, backend == "cpu", torch_device
            )
            results[(case.label, workload)] = benches
            print(table(case, workload, benches) + "\n", flush=True)
            if args.kernels:
                for b in benches:
                    print(f"  kernels {b.name}: {b.kernels}")
    print(summary(results))
    if backend == "cpu":
        print("\n" + targets(results))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)

    if args.quick and not args.out:
        return
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results_gpu.md" if args.gpu else "results.md",
    )
    cmd = " ".join([os.path.basename(sys.executable), "benchmarks/bench_bn.py", *sys.argv[1:]])
    body = [
        "# BatchNorm benchmark results",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Load: start {start}; end {load_line()} (`os.getloadavg()`, {os.cpu_count()} cores).",
        "",
        f"Command: `{cmd}` ({trials} interleaved rounds of ~{target_s * 1e3:.0f} ms per "
        "implementation; median per-call time, [min, max] over rounds; ratios are the "
        "median over rounds of the per-round ratio, both measured back to back).",
        "",
        "Traffic model for GB/s: training forward 3 passes over x, eval 2, training "
        "forward+backward 5; the floors count 2. Layout: channels-last for the JAX "
        "implementations except equinox (channels-first, its convention); torch NCHW "
        "(and channels_last memory format, `CL`). faults/call = minor page faults per call.",
        "",
        "## Summary",
        "",
        summary(results),
        "",
        *(
            ["## Issue targets (this run)", "", "```", targets(results), "```", ""]
            if backend == "cpu"
            else []
        ),
        "## Tables",
        "",
    ]
    for (label, workload), benches in results.items():
        case = next(c for c in cases if c.label == label)
        body += [table(case, workload, benches), ""]
    with open(out, "w") as f:
        f.write("\n".join(body))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
