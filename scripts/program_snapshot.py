"""Fingerprints of the XLA programs bnjax compiles for benchmarks/models.py's models.

    python scripts/program_snapshot.py --save /tmp/programs_before.json   # old code
    python scripts/program_snapshot.py --compare /tmp/programs_before.json

For every model of `benchmarks/models.py` (ResNet-18, ResNet-50, MLP, the accumulation
step; their benchmark sizes; float32 and bfloat16) it compiles bnjax's training step
and eval forward and records the compiled program's instructions without names,
metadata or source locations (`models.xla_program`). Equal fingerprints mean XLA
compiled the same program: a refactor that keeps them cannot be slower. `--compare`
names every program that changed. Run the old side with `PYTHONPATH=<old checkout>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import jax.numpy as jnp  # noqa: E402
import models  # noqa: E402

import bnjax  # noqa: E402


def fingerprints(quick: bool) -> dict[str, str]:
    out = {}
    for name, cfg in models.configs(quick).items():
        for dtype in (jnp.float32, jnp.bfloat16):
            for im in models.build(cfg, dtype, control=False):
                if not im.name.startswith("bnjax"):
                    continue
                train, _ = models._compile(im.train, (*im.state, im.batch), donate=(0, 1, 2))
                evaluate, _ = models._compile(im.eval, (im.state[0], im.state[1], im.eval_x))
                for kind, compiled in (("train", train), ("eval", evaluate)):
                    program = sorted(models.xla_program(compiled).items())
                    digest = hashlib.sha256(repr(program).encode()).hexdigest()[:16]
                    key = f"{name}/{jnp.dtype(dtype).name}/{im.name}/{kind}"
                    out[key] = digest
                    print(key, digest, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save")
    group.add_argument("--compare")
    ap.add_argument("--quick", action="store_true", help="models.py --quick's sizes")
    args = ap.parse_args()
    print("bnjax from", bnjax.__file__)
    got = fingerprints(args.quick)
    if args.save:
        pathlib.Path(args.save).write_text(json.dumps(got, indent=1))
        return
    ref = json.loads(pathlib.Path(args.compare).read_text())
    bad = sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))
    print(f"{len(got)} programs compared with {len(ref)}: {len(bad)} differ")
    for k in bad:
        print("  differs:", k)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
