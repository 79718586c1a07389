"""Benchmark: the accumulated step vs one big batch vs k separately jitted micro-steps.

For k in {1, 2, 4, 8} micro-batches of 32 (a conv-BN-relu x2 net on 16x16x3 inputs):

- temporary memory of the compiled step (`memory_analysis().temp_size_in_bytes`) of
  `bnjax.training.make_train_step(accum_steps=k)`, of one micro-batch step (32), and
  of one big-batch step (k*32);
- the same for `unroll=True` (k copies of the body; XLA:CPU runs convolution kernel
  gradients slowly inside loop bodies, jax-ml/jax#12868);
- steady-state time per optimizer step of the accumulated step, of the big-batch step,
  and of k calls of a jitted micro-step wrapped in `optax.MultiSteps` (the
  "separately jitted micro-steps" loop), interleaved round-robin and reported as
  medians, since the machine may be shared.

    python benchmarks/accumulation.py --reps 30 --out table.md    # print and write a table
    python benchmarks/accumulation.py --stats-policy full         # print only

benchmarks/accumulation_results.md collects the tables of the runs reported.

Targets (issue 5): k=8 temp memory <= 1.25x one micro-step and <= 0.3x the big
batch; accumulated time <= 1.1x the k micro-steps.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax

import bnjax
from bnjax import training

MICRO = 32
KS = (1, 2, 4, 8)
HW, C_IN, CHANNELS, CLASSES = 16, 3, (16, 32), 10


def init(key):
    params, stats = {}, {}
    keys = jax.random.split(key, len(CHANNELS) + 1)
    c = C_IN
    for i, c_out in enumerate(CHANNELS):
        params[f"conv{i}"] = jax.random.normal(keys[i], (3, 3, c, c_out)) * (2 / (9 * c)) ** 0.5
        params[f"bn{i}"], stats[f"bn{i}"] = bnjax.init(c_out)
        c = c_out
    params["fc"] = jax.random.normal(keys[-1], (c, CLASSES)) * c**-0.5
    return params, stats


BN = bnjax.batch_norm()  # PyTorch's defaults: momentum 0.1, eps 1e-5


def loss_fn(params, stats, batch):
    """Returns `(loss, (new_stats, None, reports))`: the reports feed "corrected"/"full"."""
    x, y = batch
    new, reports = {}, {}
    for i in range(len(CHANNELS)):
        x = jax.lax.conv_general_dilated(
            x, params[f"conv{i}"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x, moments = BN.normalize(params[f"bn{i}"], stats[f"bn{i}"], x, True)
        new[f"bn{i}"] = BN.update_stats(stats[f"bn{i}"], moments)
        reports[f"bn{i}"] = BN.report(moments)
        x = jax.nn.relu(x)
    logits = x.mean(axis=(1, 2)) @ params["fc"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (new, None, reports)


def plain_step(optimizer):
    def step(params, stats, opt_state, batch):
        (loss, (stats, *_)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


def data(key, *lead):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (*lead, HW, HW, C_IN))
    y = jax.random.randint(ky, lead, 0, CLASSES)
    return x, y


def temp_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run(k, reps, stats_policy):
    params, stats = init(jax.random.key(0))
    opt = optax.sgd(0.01, momentum=0.9)
    batch = data(jax.random.key(1), k, MICRO)
    flat = jax.tree.map(lambda a: a.reshape(k * MICRO, *a.shape[2:]), batch)
    micro0 = jax.tree.map(lambda a: a[0], batch)

    accum = training.make_train_step(loss_fn, opt, accum_steps=k, stats_policy=stats_policy)
    unrolled = training.make_train_step(
        loss_fn, opt, accum_steps=k, stats_policy=stats_policy, unroll=True
    )
    big = plain_step(opt)
    multi = optax.MultiSteps(opt, every_k_schedule=k)
    micro = plain_step(multi)

    mem = {
        "accum": temp_bytes(accum, params, stats, opt.init(params), batch),
        "unrolled": temp_bytes(unrolled, params, stats, opt.init(params), batch),
        "micro": temp_bytes(big, params, stats, opt.init(params), micro0),
        "big": temp_bytes(big, params, stats, opt.init(params), flat),
    }

    accum_j, big_j, micro_j = jax.jit(accum), jax.jit(big), jax.jit(micro)
    unrolled_j = jax.jit(unrolled)
    micro_batches = [jax.tree.map(lambda a, i=i: a[i], batch) for i in range(k)]
    state = {
        "accum": (params, stats, opt.init(params)),
        "unrolled": (params, stats, opt.init(params)),
        "big": (params, stats, opt.init(params)),
        "micro": (params, stats, multi.init(params)),
    }

    def call(name):
        p, s, o = state[name]
        if name == "accum":
            p, s, o, out = accum_j(p, s, o, batch)
        elif name == "unrolled":
            p, s, o, out = unrolled_j(p, s, o, batch)
        elif name == "big":
            p, s, o, out = big_j(p, s, o, flat)
        else:
            for mb in micro_batches:
                p, s, o, out = micro_j(p, s, o, mb)
        jax.block_until_ready((p, s, o, out))
        state[name] = (p, s, o)

    names = ("accum", "unrolled", "big", "micro")
    for name in names:  # compile and warm up
        call(name)
        call(name)
    times = {name: [] for name in names}
    for r in range(reps):
        order = names[r % 4 :] + names[: r % 4]  # rotate so no config always goes first
        for name in order:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
    return mem, {name: statistics.median(t) for name, t in times.items()}


def bare_scan_step(optimizer):
    """A bare `lax.scan` of `value_and_grad(loss_fn)`: no statistics policy, no checks."""

    def step(params, stats, opt_state, batch):
        def body(carry, mb):
            grads_acc, s = carry
            (loss, (s, *_)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, s, mb)
            return (jax.tree.map(lambda a, b: a + b, grads_acc, g), s), loss

        zeros = jax.tree.map(lambda p: p * 0, params)
        (grads, stats), losses = jax.lax.scan(body, (zeros, stats), batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, losses

    return step


def memory_probe(k):
    """Temporaries of make_train_step vs a bare scan vs one micro-step (MiB)."""
    params, stats = init(jax.random.key(0))
    opt = optax.sgd(0.01, momentum=0.9)
    batch = data(jax.random.key(1), k, MICRO)
    args = (params, stats, opt.init(params))
    accum = training.make_train_step(loss_fn, opt, accum_steps=k)
    mib = {
        "make_train_step": temp_bytes(accum, *args, batch),
        "bare lax.scan": temp_bytes(bare_scan_step(opt), *args, batch),
        "one micro-step": temp_bytes(plain_step(opt), *args, jax.tree.map(lambda a: a[0], batch)),
    }
    print(f"k={k}, {HW}x{HW}x{C_IN}, channels {CHANNELS}, micro-batch {MICRO}:")
    for name, b in mib.items():
        print(f"  temp {name:16s} {fmt_bytes(b)}")


def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:.2f} MiB"


def main(argv=None):
    global HW, CHANNELS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--stats-policy", default="micro", choices=("micro", "corrected", "full"))
    parser.add_argument("--out", default="-", help="write the table to this file (- prints only)")
    parser.add_argument("--hw", type=int, default=HW, help="input height and width")
    parser.add_argument("--channels", default=",".join(map(str, CHANNELS)))
    parser.add_argument(
        "--memory-probe",
        action="store_true",
        help="only compare the temporaries of make_train_step, a bare lax.scan and one "
        "micro-step at k=8",
    )
    args = parser.parse_args(argv)
    HW, CHANNELS = args.hw, tuple(int(c) for c in args.channels.split(","))
    if args.memory_probe:
        memory_probe(8)
        return []

    rows = []
    for k in KS:
        mem, t = run(k, args.reps, args.stats_policy)
        ratios = (
            f"{mem['accum'] / mem['micro']:.3f} | {mem['accum'] / mem['big']:.3f} | "
            f"{mem['unrolled'] / mem['micro']:.3f}"
            if None not in mem.values()
            else "n/a | n/a | n/a"
        )
        row = (
            f"| {k} | {k * MICRO} | {fmt_bytes(mem['accum'])} | {fmt_bytes(mem['micro'])} | "
            f"{fmt_bytes(mem['big'])} | {ratios} | {t['accum'] * 1e3:.2f} | "
            f"{t['unrolled'] * 1e3:.2f} | {t['micro'] * 1e3:.2f} | {t['big'] * 1e3:.2f} | "
            f"{t['accum'] / t['micro']:.3f} | {t['unrolled'] / t['micro']:.3f} |"
        )
        print(row, flush=True)
        rows.append(row)

    device = jax.devices()[0]
    header = [
        "# Accumulation benchmark (`benchmarks/accumulation.py`)",
        "",
        f"Command: `python benchmarks/accumulation.py --reps {args.reps} "
        f"--stats-policy {args.stats_policy}`",
        f"Device: {device.platform} ({device.device_kind}), {platform.machine()}, "
        f"jax {jax.__version__}, {len(jax.devices())} device(s). Model: conv3x3(16)-BN-relu, "
        f"conv3x3(32)-BN-relu, mean, dense(10) on {HW}x{HW}x{C_IN}, SGD+momentum; "
        f"micro-batch {MICRO}. Times are medians of {args.reps} interleaved rounds per "
        "optimizer step (k micro-batches); memory is the compiled step's temporaries.",
        "",
        "| k | k*B | temp accum | temp micro (B) | temp big (k*B) | accum/micro | accum/big "
        "| unrolled/micro | ms accum | ms unrolled | ms k micro (MultiSteps) | ms big "
        "| accum / k micro | unrolled / k micro |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
