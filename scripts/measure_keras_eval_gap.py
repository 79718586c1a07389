"""How far bnjax's evaluation is from Keras's after the same training, per Keras fixture.

Training outputs, gradients and the renorm statistics agree with Keras (the tests
hold them to float32 tolerance); the *running* statistics follow PyTorch's
convention (an EMA of the unbiased batch variance), where Keras's unfused layer
keeps an EMA of the biased variance and, with `renorm=True`, derives its moving
variance from an EMA of `sqrt(var + eps)`. So evaluation with bnjax's own running
statistics differs from Keras's unless Keras's moving statistics are loaded. This
script replays each fixture's training steps with bnjax from its own initial
statistics (mean 0, var 1, as Keras starts), evaluates the fixture's eval batch, and
prints the largest difference to Keras's eval output, relative to the range of that
output. Reads only `tests/fixtures/keras_*.npz` (no TensorFlow needed):

    python scripts/measure_keras_eval_gap.py
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def gap(path: Path) -> tuple[str, dict, float, float]:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    kw = meta["keras_kwargs"]
    opts: dict = {"momentum": round(1 - kw["momentum"], 12), "eps": kw["epsilon"]}
    if kw.get("renorm"):
        opts["renorm"] = bnjax.Renorm.keras(
            kw.get("renorm_clipping"), kw.get("renorm_momentum", 0.99)
        )
    vbs = kw.get("virtual_batch_size")
    opts["virtual_batch_size"] = vbs
    n = arrays["x_0"].shape[0]
    # Keras's ghost g is the strided rows g, g + G, ...; bnjax's the contiguous ones.
    perm = np.arange(n) if vbs is None else np.arange(n).reshape(vbs, n // vbs).T.ravel()
    params = {"weight": jnp.asarray(arrays["gamma"]), "bias": jnp.asarray(arrays["beta"])}
    _, stats = bnjax.init(arrays["gamma"].shape[0], renorm="renorm" in opts)
    train = jax.jit(lambda s, x: bnjax.apply(params, s, x, True, **opts)[1])
    for t in range(meta["steps"]):
        stats = train(stats, jnp.asarray(arrays[f"x_{t}"][perm]))
    eval_opts = {k: v for k, v in opts.items() if k != "momentum"}
    y, _ = bnjax.apply(params, stats, jnp.asarray(arrays["x_eval"]), False, **eval_opts)
    ref = arrays["y_eval"].astype(np.float64)
    diff = np.abs(np.asarray(y, np.float64) - ref)
    span = float(ref.max() - ref.min())
    return meta["scenario"], kw, float(diff.max()), float(diff.max()) / span


def main() -> None:
    print("| fixture | Keras layer | max abs diff of eval output | relative to its range |")
    print("|---|---|---|---|")
    for path in sorted(FIXTURES.glob("keras_*.npz")):
        name, kw, absolute, relative = gap(path)
        layer = "fused" if kw.get("fused") else "unfused"
        if kw.get("renorm"):
            layer += ", renorm"
        if kw.get("virtual_batch_size"):
            layer += f", ghost {kw['virtual_batch_size']}"
        print(f"| `{name}` | {layer} | {absolute:.3g} | {100 * relative:.2g}% |")


if __name__ == "__main__":
    main()
