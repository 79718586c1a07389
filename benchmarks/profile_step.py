"""Where a whole model's training step spends its time, kernel kind by kernel kind.

Usage (from the repository root):

    python benchmarks/profile_step.py --model resnet50 --dtype float32
    taskset -c 0 python benchmarks/profile_step.py --model resnet50    # one core: work only

Builds the model of `benchmarks/models.py` with `bnjax.linen.BatchNorm` and with
`flax.linen.BatchNorm`, runs `--steps` training steps of each under `jax.profiler`,
and sums the duration of XLA:CPU's kernels by kind (the fusion's name without its
number: `transpose_copy_fusion`, `ynn_fusion`, `convolution`, ...), in ms per step,
with the number of kernels of that kind per step.

On two or more cores kernels run side by side and a kernel's duration includes the
time its partitions wait for a busy thread, so the totals exceed the step's wall
time; pinned to one core (`taskset -c 0`), the totals are the work itself. This is
how the transposed copies that recomputed BatchNorm's backward were found
(docs/performance_models.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

from _common import pin_malloc

pin_malloc()  # before JAX allocates anything

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import models  # noqa: E402  (benchmarks/models.py)


def kernel_times(compiled, state: tuple, batch: tuple, steps: int) -> dict[str, tuple]:
    """{kind: (ms per step, kernels per step)} for `steps` calls of `compiled`."""
    state = jax.tree.map(jnp.copy, state)
    for _ in range(3):
        *state, loss = compiled(*state, batch)
        jax.block_until_ready(loss)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                *state, loss = compiled(*state, batch)
                jax.block_until_ready(loss)
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    ns: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                name = ev.name
                if name.startswith(("ThunkExecutor", "end:", "Threadpool")) or "Await" in name:
                    continue
                kind = re.sub(r"[.\d]+$", "", name)
                ns[kind] += ev.duration_ns
                count[kind] += 1
    return {k: (ns[k] / 1e6 / steps, count[k] / steps) for k in ns}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", help="resnet18, resnet50, mlp, accum")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=None, help="override the model's batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    cfg = models.configs(False, args.batch)[args.model]
    impls = models.build(cfg, jnp.dtype(args.dtype), control=False)
    impls = [impls[0], next(im for im in impls if im.name == models.REF)]
    results = {}
    for im in impls:
        compiled = jax.jit(im.train, donate_argnums=(0, 1, 2)).lower(*im.state, im.batch)
        results[im.name] = kernel_times(compiled.compile(), im.state, im.batch, args.steps)
    kinds = sorted(
        set().union(*results.values()),
        key=lambda k: -max(r.get(k, (0, 0))[0] for r in results.values()),
    )
    print(
        f"{args.model} {args.dtype} batch {cfg.batch}; {os.cpu_count()} cores visible, "
        f"{len(os.sched_getaffinity(0))} usable; ms per step (kernels per step)"
    )
    print(f"{'kernel kind':32s}" + "".join(f"{n:>26s}" for n in results))
    for k in kinds[: args.top]:
        cells = "".join(
            f"{results[n].get(k, (0, 0))[0]:17.2f} ({results[n].get(k, (0, 0))[1]:5.0f})"
            for n in results
        )
        print(f"{k[:32]:32s}{cells}")
    totals = "".join(f"{sum(v[0] for v in r.values()):17.2f}        " for r in results.values())
    print(f"{'total':32s}{totals}")


if __name__ == "__main__":
    main()
