"""Whole models: bnjax against flax.linen with only the BatchNorm swapped, in one process.

Usage (from the repository root):

    python benchmarks/models.py --quick        # a minute or two: mlp, resnet18, accum; float32
    python benchmarks/models.py                # full run, writes benchmarks/models_results.md
    python benchmarks/models.py --models resnet18 --dtypes float32 --rounds 9
    python benchmarks/models.py --models resnet50 --dtypes float32 --batch 32 --out /tmp/b32.md

Models (channels-last, reduced image size so that CPU runs stay short):

* `resnet18`: torchvision's ResNet-18 layout (7x7 stem, max-pool, BasicBlocks
  [2, 2, 2, 2], widths 64-512), 20 BatchNorms.
* `resnet50`: ResNet-50's layout (Bottlenecks [3, 4, 6, 3], expansion 4), 53
  BatchNorms, at a quarter of the width (16-128 inner channels) so that its compile and
  step stay short on CPU; the number and kinds of ops are ResNet-50's.
* `mlp`: 784-512-512-10 with BatchNorm1d after each hidden layer, also written
  functionally with `bnjax.apply` (`bnjax (functional)`).
* `accum`: `bnjax.training.make_train_step` with k=4 micro-batches (the ResNet-18
  model, `stats_policy="micro"`, the policy flax.linen's BatchNorm can follow).
* `resnet18_inbn`: ResNet-18 whose first BatchNorm normalizes the raw input image
  (a "data BatchNorm"), so that one BatchNorm reads its input from memory rather than
  from a convolution's output inside one fusion.

Each BatchNorm is `bnjax.linen.BatchNorm(momentum=0.1)` or
`flax.linen.BatchNorm(momentum=0.9, dtype=dtype)`; everything else is the same module.

Method (as `bench_bn.py`):

* Training step = loss, gradient, optax SGD-momentum update, new batch statistics,
  jitted with the state donated and threaded from call to call. Eval = the forward
  with the running statistics. Train fwd = the training-mode forward alone (batch
  statistics, new running statistics, no gradient): what precise BN runs per batch.
* Compile time = trace + lower + XLA compile of a fresh closure (nothing cached),
  wall clock; `--compiles` of them, interleaved between implementations; reported is
  each one's median and the median of the per-round ratios.
* Step and eval time: `--rounds` round-robin rounds, each implementation running
  back to back inside a round; ratio = median over rounds of the per-round ratio (a
  slow spell of a shared machine scales both), with the quartiles of those ratios.
* Memory: `compiled.memory_analysis()` of the training step (temporary buffers, and
  the total, arguments + outputs + temporaries - donated aliases: the most the
  step holds at once, by XLA's buffer assignment).
* Control: flax.linen's model is built, compiled and timed a second time
  (`flax.linen (control)`). It is the same program, so its distance from 1.0x is what
  this method cannot resolve (where XLA places buffers, what else the machine does);
  a ratio over its target by less than that is reported `within resolution`.
* Same program: a verdict other than MET says when XLA compiled bnjax's step or eval
  into flax.linen's program, instruction for instruction (names and source locations
  aside); a ratio between them is then the machine's.
* glibc's allocator is pinned first (`_common.pin_malloc`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import load_line, paired_median, pin_malloc

MALLOPT_OK = pin_malloc()  # before JAX allocates anything

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bnjax  # noqa: E402
import bnjax.linen  # noqa: E402
from bnjax import training  # noqa: E402

MOMENTUM, EPS = 0.1, 1e-5  # PyTorch's; flax.linen's momentum is 1 - MOMENTUM
REF = "flax.linen"
CONTROL = "flax.linen (control)"
CLASSES = 10


# --------------------------------------------------------------------------- models


def bnjax_norm(dtype: Any) -> Callable[[], nn.Module]:
    """bnjax.linen.BatchNorm (keeps x's dtype, so a bfloat16 network stays bfloat16)."""
    del dtype
    return functools.partial(bnjax.linen.BatchNorm, momentum=MOMENTUM, epsilon=EPS)


def flax_norm(dtype: Any) -> Callable[[], nn.Module]:
    """flax.linen.BatchNorm with the network's dtype (its default would promote to f32)."""
    return functools.partial(nn.BatchNorm, momentum=1 - MOMENTUM, epsilon=EPS, dtype=dtype)


class BasicBlock(nn.Module):
    filters: int
    strides: int
    norm: Callable[[], nn.Module]
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
        ura = not train
        y = conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y, use_running_average=ura))
        y = conv(self.filters, (3, 3))(y)
        y = self.norm()(y, use_running_average=ura)
        if x.shape != y.shape:
            x = conv(self.filters, (1, 1), self.strides)(x)
            x = self.norm()(x, use_running_average=ura)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    filters: int
    strides: int
    norm: Callable[[], nn.Module]
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
        ura = not train
        y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x), use_running_average=ura))
        y = conv(self.filters, (3, 3), self.strides)(y)
        y = nn.relu(self.norm()(y, use_running_average=ura))
        y = self.norm()(conv(4 * self.filters, (1, 1))(y), use_running_average=ura)
        if x.shape != y.shape:
            x = conv(4 * self.filters, (1, 1), self.strides)(x)
            x = self.norm()(x, use_running_average=ura)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """torchvision's ResNet layout, channels-last, `norm` the only BatchNorm."""

    stages: Sequence[int]
    block: Any
    width: int
    norm: Callable[[], nn.Module]
    dtype: Any = jnp.float32
    input_bn: bool = False  # a BatchNorm on the raw input, before the stem

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        if self.input_bn:
            x = self.norm()(x, use_running_average=not train)
        x = nn.Conv(
            self.width, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False, dtype=self.dtype
        )(x)
        x = nn.relu(self.norm()(x, use_running_average=not train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
        for i, n_blocks in enumerate(self.stages):
            for j in range(n_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block(self.width * 2**i, strides, self.norm, self.dtype)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(CLASSES, dtype=self.dtype)(x)


class MLP(nn.Module):
    hidden: Sequence[int]
    norm: Callable[[], nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        for h in self.hidden:
            x = nn.Dense(h, use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(self.norm()(x, use_running_average=not train))
        return nn.Dense(CLASSES, dtype=self.dtype)(x)


# ------------------------------------------------------------------ the workloads


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


OPTIMIZER = optax.sgd(1e-3, momentum=0.9)


@dataclass
class Impl:
    """One implementation of one model: state, a train step and an eval function."""

    name: str
    state: tuple  # (params, batch_stats, opt_state)
    train: Callable  # (params, batch_stats, opt_state, batch) -> (..., loss)
    eval: Callable  # (params, batch_stats, x) -> logits
    batch: tuple  # (x, labels), or (k, ...) micro-batches for the accumulation step
    eval_x: jax.Array
    # (params, batch_stats, x) -> (logits, new batch_stats): the training-mode forward
    # alone (precise BN's per-batch work), or None where it is not measured.
    forward: Callable | None = None
    compiled_train: Any = None
    compiled_eval: Any = None
    compiled_forward: Any = None
    compile_train_s: list[float] = field(default_factory=list)
    compile_eval_s: float = float("nan")
    train_times: list[float] = field(default_factory=list)
    eval_times: list[float] = field(default_factory=list)
    forward_times: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)


def linen_impl(name: str, model: nn.Module, x: jax.Array, labels: jax.Array) -> Impl:
    variables = model.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def train(params, stats, opt_state, batch):
        x, labels = batch

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return _loss(logits, labels), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    def evaluate(params, stats, x):
        return model.apply({"params": params, "batch_stats": stats}, x, train=False)

    def forward(params, stats, x):
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return logits, upd["batch_stats"]

    state = (params, stats, OPTIMIZER.init(params))
    return Impl(name, state, train, evaluate, (x, labels), x, forward)


def accum_impl(name: str, model: nn.Module, x: jax.Array, labels: jax.Array, k: int) -> Impl:
    """`make_train_step(accum_steps=k)` over the model; `x` is the whole batch of k*B."""
    variables = model.init(jax.random.key(0), x[: x.shape[0] // k], train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def loss_fn(params, stats, micro):
        mx, my = micro
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, mx, train=True, mutable=["batch_stats"]
        )
        return _loss(logits, my), (upd["batch_stats"], None)

    step = training.make_train_step(loss_fn, OPTIMIZER, accum_steps=k)

    def train(params, stats, opt_state, batch):
        params, stats, opt_state, metrics = step(params, stats, opt_state, batch)
        return params, stats, opt_state, metrics.loss.mean()

    def evaluate(params, stats, x):
        return model.apply({"params": params, "batch_stats": stats}, x, train=False)

    batch = training.split_micro_batches((x, labels), k)
    state = (params, stats, OPTIMIZER.init(params))
    return Impl(name, state, train, evaluate, batch, x)


def functional_mlp_impl(hidden: Sequence[int], x: jax.Array, labels: jax.Array) -> Impl:
    """The MLP written as a pure function around `bnjax.apply` (no Flax)."""
    dtype = x.dtype
    keys = jax.random.split(jax.random.key(0), len(hidden) + 1)
    params, stats = {}, {}
    fan_in = x.shape[-1]
    for i, h in enumerate(hidden):
        params[f"dense{i}"] = jax.random.normal(keys[i], (fan_in, h)) * fan_in**-0.5
        params[f"bn{i}"], stats[f"bn{i}"] = bnjax.init(h)
        fan_in = h
    params["head"] = {
        "w": jax.random.normal(keys[-1], (fan_in, CLASSES)) * fan_in**-0.5,
        "b": jnp.zeros(CLASSES),
    }

    def forward(params, stats, x, train):
        x = x.astype(dtype)
        new = {}
        for i in range(len(hidden)):
            x = x @ params[f"dense{i}"].astype(dtype)
            x, new[f"bn{i}"] = bnjax.apply(
                params[f"bn{i}"], stats[f"bn{i}"], x, train, momentum=MOMENTUM, eps=EPS
            )
            x = jax.nn.relu(x)
        head = params["head"]
        return x @ head["w"].astype(dtype) + head["b"].astype(dtype), new

    def train(params, stats, opt_state, batch):
        x, labels = batch

        def loss_fn(p):
            logits, new = forward(p, stats, x, True)
            return _loss(logits, labels), new

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    def evaluate(params, stats, x):
        return forward(params, stats, x, False)[0]

    def train_forward(params, stats, x):
        return forward(params, stats, x, True)

    state = (params, stats, OPTIMIZER.init(params))
    return Impl("bnjax (functional)", state, train, evaluate, (x, labels), x, train_forward)


@dataclass
class Config:
    """A model at a size: what `build` needs."""

    name: str
    batch: int
    image: int | None  # None: flat features (the MLP)
    features: int = 784


def configs(quick: bool, batch: int | None = None) -> dict[str, Config]:
    """The models at their benchmark sizes; `batch` overrides every model's batch."""
    if batch:
        return {k: Config(c.name, batch, c.image, c.features) for k, c in configs(quick).items()}
    if quick:
        return {
            "resnet18": Config("resnet18", 8, 32),
            "resnet50": Config("resnet50", 4, 32),
            "mlp": Config("mlp", 64, None),
            "accum": Config("accum", 8, 32),
            "resnet18_inbn": Config("resnet18_inbn", 8, 32),
        }
    return {
        "resnet18": Config("resnet18", 32, 64),
        "resnet50": Config("resnet50", 16, 64),
        "mlp": Config("mlp", 256, None),
        "accum": Config("accum", 32, 64),
        "resnet18_inbn": Config("resnet18_inbn", 32, 64),
    }


def build(cfg: Config, dtype: Any, control: bool = True) -> list[Impl]:
    rng = np.random.default_rng(0)
    if cfg.image is None:
        x = rng.standard_normal((cfg.batch, cfg.features), np.float32)
    else:
        x = rng.standard_normal((cfg.batch, cfg.image, cfg.image, 3), np.float32)
    x = jnp.asarray(x, dtype)
    labels = jnp.asarray(rng.integers(0, CLASSES, cfg.batch), jnp.int32)
    impls = []
    builds = [("bnjax.linen", bnjax_norm), (REF, flax_norm)]
    if control:
        # flax.linen's model once more, built, compiled and timed like the others. It
        # is the same program, so its ratio to flax.linen is this method's resolution
        # (where XLA happens to place buffers, what else the machine does).
        builds.append((CONTROL, flax_norm))
    for name, norm in builds:
        n = norm(dtype)
        if cfg.name in ("resnet18", "accum", "resnet18_inbn"):
            model = ResNet((2, 2, 2, 2), BasicBlock, 64, n, dtype, cfg.name == "resnet18_inbn")
        elif cfg.name == "resnet50":
            model = ResNet((3, 4, 6, 3), Bottleneck, 16, n, dtype)
        else:
            model = MLP((512, 512), n, dtype)
        if cfg.name == "accum":
            impls.append(accum_impl(name, model, x, labels, 4))
        else:
            impls.append(linen_impl(name, model, x, labels))
    if cfg.name == "mlp":
        impls.insert(1, functional_mlp_impl((512, 512), x, labels))
    return impls


# ----------------------------------------------------------------------- measuring


def _compile(fn: Callable, args: tuple, donate: tuple[int, ...] = ()) -> tuple[Any, float]:
    """`fn` compiled from a fresh closure (nothing cached) and the wall time it took."""
    t0 = time.perf_counter()
    compiled = jax.jit(lambda *a: fn(*a), donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def compile_all(impls: list[Impl], compiles: int) -> None:
    """Train steps compiled `compiles` times, interleaved; eval once; memory recorded."""
    for r in range(compiles):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for im in order:
            c, dt = _compile(im.train, (*im.state, im.batch), donate=(0, 1, 2))
            im.compiled_train = c
            im.compile_train_s.append(dt)
    for im in impls:
        im.compiled_eval, im.compile_eval_s = _compile(
            im.eval, (im.state[0], im.state[1], im.eval_x)
        )
        if im.forward is not None:
            im.compiled_forward, _ = _compile(im.forward, (im.state[0], im.state[1], im.eval_x))
        m = im.compiled_train.memory_analysis()
        im.memory = {
            "temp": m.temp_size_in_bytes / 2**20,
            "total": (
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                + m.temp_size_in_bytes
                - m.alias_size_in_bytes
            )
            / 2**20,
        }


def xla_program(compiled: Any) -> collections.Counter:
    """A compiled program's instructions, without names, metadata or source locations.

    Two implementations with equal counters run the same kernels: XLA compiled the
    same program for both, and a time ratio between them is the machine's, not theirs.
    """
    lines = (
        re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", ln)).strip()
        for ln in compiled.as_text().splitlines()
    )
    return collections.Counter(ln for ln in lines if " = " in ln)


def _fresh_state(im: Impl) -> tuple:
    """A copy of the initial state (the compiled step donates what it is given)."""
    return jax.tree.map(jnp.copy, im.state)


def run_rounds(impls: list[Impl], rounds: int, target_s: float) -> None:
    states = {im.name: _fresh_state(im) for im in impls}

    def train_call(im: Impl) -> Any:
        *state, loss = im.compiled_train(*states[im.name], im.batch)
        states[im.name] = tuple(state)
        return loss

    def eval_call(im: Impl) -> Any:
        return im.compiled_eval(im.state[0], im.state[1], im.eval_x)

    def forward_call(im: Impl) -> Any:
        return im.compiled_forward(im.state[0], im.state[1], im.eval_x)

    workloads = [("train", train_call), ("eval", eval_call)]
    if all(im.forward is not None for im in impls):
        workloads.append(("forward", forward_call))
    times = {"train": "train_times", "eval": "eval_times", "forward": "forward_times"}
    reps: dict[tuple[str, str], int] = {}
    for im in impls:  # warm up (page in, fill the allocator's free lists), size the rounds
        for kind, call in workloads:
            for _ in range(2):
                jax.block_until_ready(call(im))
            t0 = time.perf_counter()
            jax.block_until_ready(call(im))
            dt = max(time.perf_counter() - t0, 1e-6)
            reps[(im.name, kind)] = max(1, min(100, int(target_s / dt)))
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for kind, call in workloads:
            for im in order:
                n = reps[(im.name, kind)]
                t0 = time.perf_counter()
                for _ in range(n):
                    jax.block_until_ready(call(im))
                dt = (time.perf_counter() - t0) / n
                getattr(im, times[kind]).append(dt)


# ----------------------------------------------------------------------- reporting


def _quartiles(ratios: Sequence[float]) -> tuple[float, float]:
    if len(ratios) < 2:
        return (ratios[0], ratios[0]) if ratios else (float("nan"),) * 2
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def _ratio(times: Sequence[float], ref: Sequence[float]) -> str:
    r = paired_median(times, ref)
    lo, hi = _quartiles([t / s for t, s in zip(times, ref, strict=True)])
    return f"{r:.3f} [{lo:.2f}, {hi:.2f}]"


def table(model: str, dtype: str, impls: list[Impl]) -> str:
    ref = next(im for im in impls if im.name == REF)
    lines = [
        f"#### {model}, {dtype}",
        "",
        "| implementation | train ms | x flax.linen | eval ms | x flax.linen "
        "| train fwd ms | x flax.linen "
        "| train compile s | x flax.linen | eval compile s | temp MiB | total MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for im in impls:
        fwd = (
            f"| {statistics.median(im.forward_times) * 1e3:.2f} "
            f"| {_ratio(im.forward_times, ref.forward_times)} "
            if im.forward_times
            else "| - | - "
        )
        lines.append(
            f"| {im.name} | {statistics.median(im.train_times) * 1e3:.2f} "
            f"| {_ratio(im.train_times, ref.train_times)} "
            f"| {statistics.median(im.eval_times) * 1e3:.2f} "
            f"| {_ratio(im.eval_times, ref.eval_times)} "
            + fwd
            + f"| {statistics.median(im.compile_train_s):.2f} "
            f"| {_ratio(im.compile_train_s, ref.compile_train_s)} "
            f"| {im.compile_eval_s:.2f} | {im.memory['temp']:.1f} | {im.memory['total']:.1f} |"
        )
    return "\n".join(lines)


def _checks(model: str, im: Impl, ref: Impl) -> list[tuple[str, float, float]]:
    """(what, ratio to flax.linen, target) for one implementation."""
    checks = [
        ("train", paired_median(im.train_times, ref.train_times), 1.0),
        ("eval", paired_median(im.eval_times, ref.eval_times), 1.0),
        ("temp memory", im.memory["temp"] / max(ref.memory["temp"], 1e-9), 1.0),
    ]
    if im.forward_times and ref.forward_times:
        checks.append(("train fwd", paired_median(im.forward_times, ref.forward_times), 1.0))
    if model.startswith("resnet"):
        checks.append(
            ("train compile", paired_median(im.compile_train_s, ref.compile_train_s), 1.05)
        )
    return checks


def targets(results: dict[tuple[str, str], list[Impl]]) -> str:
    """The issue's whole-model targets against this run.

    A ratio above its target by no more than the control's distance from 1.0 (the same
    program as flax.linen, measured the same way) is reported as `within resolution`:
    this run cannot tell it from a met target. A verdict other than MET says when
    bnjax's compiled program is flax.linen's, instruction for instruction
    (`xla_program`): the difference is then in the machine, not in the kernels.
    """
    lines = []
    for (model, dtype), impls in results.items():
        ref = next(im for im in impls if im.name == REF)
        control = {
            what: r
            for what, r, _ in _checks(model, next(im for im in impls if im.name == CONTROL), ref)
        }
        for im in impls:
            if im.name in (REF, CONTROL):
                continue
            same = {
                "train": xla_program(im.compiled_train) == xla_program(ref.compiled_train),
                "eval": xla_program(im.compiled_eval) == xla_program(ref.compiled_eval),
            }
            if im.compiled_forward is not None and ref.compiled_forward is not None:
                same["train fwd"] = xla_program(im.compiled_forward) == xla_program(
                    ref.compiled_forward
                )
            for what, r, bound in _checks(model, im, ref):
                resolution = abs(control[what] - 1.0)
                r, resolution = round(r, 3), round(resolution, 3)  # as printed
                if r <= bound:
                    verdict = "MET"
                elif r <= bound + resolution:
                    verdict = "within resolution"
                else:
                    verdict = "missed"
                if same.get(what) and verdict != "MET":
                    verdict += " (the same XLA program as flax.linen's)"
                lines.append(
                    f"{model} {dtype} {im.name} {what}: {r:.3f}x flax.linen "
                    f"(target <= {bound}; control {control[what]:.3f}x) {verdict}"
                )
    return "\n".join(lines)


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    accel = "" if dev.platform == "cpu" else f", device {dev.device_kind}"
    return (
        f"{cpu}, {os.cpu_count()} cores{accel}; Python {platform.python_version()}; "
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"numpy {np.__version__}; mallopt pinned: {MALLOPT_OK}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, float32, no file")
    ap.add_argument(
        "--models", default=None, help="default resnet18,resnet50,mlp,accum,resnet18_inbn"
    )
    ap.add_argument("--dtypes", default=None, help="float32,bfloat16 (quick: float32)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--compiles", type=int, default=None, help="fresh compiles per step")
    ap.add_argument("--target-ms", type=float, default=None, help="time per round per impl")
    ap.add_argument("--out", default=None, help="results file (default: models_results.md)")
    ap.add_argument("--batch", type=int, default=None, help="override every model's batch")
    args = ap.parse_args(argv)

    quick = args.quick
    models = args.models or (
        "mlp,resnet18,accum,resnet18_inbn" if quick else "resnet18,resnet50,mlp,accum,resnet18_inbn"
    )
    dtypes = (args.dtypes or ("float32" if quick else "float32,bfloat16")).split(",")
    rounds = args.rounds or (3 if quick else 11)
    compiles = args.compiles or (1 if quick else 3)
    target_s = (args.target_ms or (50 if quick else 200)) / 1e3
    cfgs = configs(quick, args.batch)

    print(machine_line(), flush=True)
    start = load_line()
    print("start:", start, flush=True)
    t_start = time.perf_counter()
    # The process's first compiles pay one-time costs (LLVM, JAX's caches) that would
    # fall on whichever implementation comes first: pay them on a throwaway model.
    for im in build(configs(quick=True)["mlp"], jnp.dtype(dtypes[0]), control=False):
        _compile(im.train, (*im.state, im.batch))
    results: dict[tuple[str, str], list[Impl]] = {}
    for model in models.split(","):
        for dtype in dtypes:
            impls = build(cfgs[model], jnp.dtype(dtype))
            compile_all(impls, compiles)
            run_rounds(impls, rounds, target_s)
            results[(model, dtype)] = impls
            print(table(model, dtype, impls) + "\n", flush=True)
    end = load_line()
    print(targets(results))
    print(f"\nend: {end}; total {time.perf_counter() - t_start:.0f} s", flush=True)

    if quick and not args.out:
        return
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "models_results.md")
    cmd = " ".join([os.path.basename(sys.executable), "benchmarks/models.py", *sys.argv[1:]])
    sizes = ", ".join(
        f"{c.name} batch {c.batch}"
        + (f" x {c.image}x{c.image}x3" if c.image else f" x {c.features}")
        for c in cfgs.values()
    )
    body = [
        "# Whole models: bnjax.linen.BatchNorm against flax.linen.BatchNorm",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Start: {start}. End: {end} (`os.getloadavg()`; the machine has {os.cpu_count()} cores).",
        "",
        f"Command: `{cmd}` ({rounds} interleaved rounds of ~{target_s * 1e3:.0f} ms per "
        f"implementation and workload; {compiles} fresh compiles of each training step). "
        f"Sizes: {sizes}. Times are medians over rounds; `x flax.linen` is the median of "
        "the per-round ratios, [first, third quartile] of those ratios; compile ratios "
        "pair the i-th compile of each. temp/total: `memory_analysis()` of the compiled "
        "training step (state donated).",
        "",
        "GPU: no accelerator was available for this run; `results_gpu.md` is unchanged.",
        "",
        "## Issue targets (this run)",
        "",
        "```",
        targets(results),
        "```",
        "",
        "## Tables",
        "",
    ]
    for (model, dtype), impls in results.items():
        body += [table(model, dtype, impls), ""]
    with open(out, "w") as f:
        f.write("\n".join(body))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
