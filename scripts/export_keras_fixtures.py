"""Export Keras Batch Renormalization and ghost-batch runs as `.npz` fixtures for bnjax.

The oracle is `tf_keras.layers.BatchNormalization` (the Keras 2 line, which keeps
`renorm`, `renorm_clipping`, `renorm_momentum` and `virtual_batch_size`) on
TensorFlow's CPU build. Usage, in a venv of its own (never the project's):

    python3 -m venv /work/venv-tf
    /work/venv-tf/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0 numpy==2.4.6
    /work/venv-tf/bin/python scripts/export_keras_fixtures.py --out-dir tests/fixtures

Each scenario is one layer, float32, with non-trivial gamma/beta, run for STEPS
training calls on fresh inputs (loss = sum(y * g_t) for a fixed random g_t; the
parameters are not updated, the moving statistics are), then one eval call. One file
per scenario, `keras_<name>.npz`:

  `gamma`, `beta`            (C,) the layer's parameters;
  `x_<t>`, `g_<t>`           step t's input and upstream gradient;
  `y_<t>`, `dx_<t>`, `dgamma_<t>`, `dbeta_<t>`   step t's train output and gradients;
  `moving_mean_<t>`, `moving_variance_<t>`       after step t (Keras's);
  `renorm_mean_<t>`, `renorm_stddev_<t>`         after step t (renorm scenarios);
  `plain_moving_variance_<t>`  after step t, of a plain (renorm=False) layer fed the
                               same inputs (renorm scenarios): Keras's EMA of the
                               biased batch variance;
  `x_eval`, `y_eval`         the eval call (training=False) after the last step.

`__meta__` is a JSON string: versions, the command, the scenario's Keras arguments.
Keras's conventions (what the tests convert): momentum is the weight of the OLD
value (`new = momentum * old + (1 - momentum) * batch`), the moving variance is the
biased one, ghost batch g is the strided rows `g, g + G, ...` of the batch, and with
renorm its moving variance is `moving_stddev**2 - eps` with `moving_stddev` an EMA of
`sqrt(var + eps)`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # deterministic reference kernels

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

COMMAND = "python scripts/export_keras_fixtures.py --out-dir tests/fixtures"
STEPS = 4
MOMENTUM = 0.8  # Keras's: bnjax's momentum=0.2
RENORM_MOMENTUM = 0.7  # Keras's: bnjax's Renorm(momentum=0.3)
EPSILON = 1e-3  # Keras's default, 100x PyTorch's: the eps placement shows

CLIP = {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5}}
NOCLIP = {"renorm": True, "renorm_clipping": {"rmax": 100.0, "rmin": 0.01, "dmax": 100.0}}
# name: (x shape per step, Keras layer kwargs beyond the common ones[, data options])
SCENARIOS = {
    "renorm_clip_2d": ((8, 3), CLIP),
    "renorm_noclip_2d": ((8, 3), NOCLIP),
    "renorm_clip_4d": ((4, 3, 3, 2), CLIP),
    "renorm_noclip_4d": ((4, 3, 3, 2), NOCLIP),
    "ghost_2d": ((8, 3), {"virtual_batch_size": 4}),
    "ghost_4d": ((6, 2, 2, 3), {"virtual_batch_size": 2}),
    "ghost_renorm_4d": ((6, 2, 2, 3), {"virtual_batch_size": 3, **CLIP}),
    # Keras's `renorm=True` as it comes (no renorm_clipping, renorm_momentum 0.99),
    # on inputs far enough from the renorm statistics that Renorm()'s default clipping
    # (rmax 3, dmax 5) would bind: what `bnjax.Renorm.keras()` must reproduce.
    "renorm_keras_defaults_2d": ((8, 3), {"renorm": True}, {"loc": 6.0, "scale": (0.1, 6.0)}),
    # Keras's default fused 4D layer: its moving variance is the unbiased one.
    "fused_4d": ((4, 3, 3, 2), {"fused": True}),
}
# Scenarios whose renorm momentum is Keras's default (no renorm_momentum argument).
KERAS_DEFAULTS = {"renorm_keras_defaults_2d"}


def _extra(name: str, kwargs: dict) -> dict:
    """The renorm momentum every renorm scenario uses, unless it keeps Keras's default."""
    if kwargs.get("renorm") and name not in KERAS_DEFAULTS:
        return {"renorm_momentum": RENORM_MOMENTUM}
    return {}


def _layer(kwargs: dict, shape: tuple[int, ...], extra: dict) -> tf_keras.layers.BatchNormalization:
    layer = tf_keras.layers.BatchNormalization(
        axis=-1, momentum=MOMENTUM, epsilon=EPSILON, **{"fused": False, **kwargs}, **extra
    )
    layer.build(shape)
    return layer


def _assign(var: tf.Variable, value: np.ndarray) -> None:
    var.assign(np.reshape(value, var.shape).astype(np.float32))


def run(
    name: str,
    shape: tuple[int, ...],
    kwargs: dict,
    seed: int,
    data: dict | None = None,
    command: str = COMMAND,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = data or {}
    c = shape[-1]
    extra = _extra(name, kwargs)
    layer = _layer(kwargs, shape, extra)
    plain = _layer({k: v for k, v in kwargs.items() if not k.startswith("renorm")}, shape, {})
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.normal(size=c).astype(np.float32)
    for lay in (layer, plain):
        _assign(lay.gamma, gamma)
        _assign(lay.beta, beta)
    out = {"gamma": gamma, "beta": beta}
    for t in range(STEPS):
        # Per-feature means and scales that move from step to step, so r and d vary.
        loc = rng.normal(size=c) * data.get("loc", 2.0) + 0.5 * t
        scale = rng.uniform(*data.get("scale", (0.3, 3.0)), c)
        x = (rng.normal(size=shape) * scale + loc).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * g)
        dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        plain(xt, training=True)
        out.update(
            {
                f"x_{t}": x,
                f"g_{t}": g,
                f"y_{t}": y.numpy(),
                f"dx_{t}": dx.numpy(),
                f"dgamma_{t}": dgamma.numpy().reshape(c),
                f"dbeta_{t}": dbeta.numpy().reshape(c),
                f"moving_mean_{t}": layer.moving_mean.numpy().reshape(c),
                f"moving_variance_{t}": layer.moving_variance.numpy().reshape(c),
            }
        )
        if kwargs.get("renorm"):
            out[f"renorm_mean_{t}"] = layer.renorm_mean.numpy().reshape(c)
            out[f"renorm_stddev_{t}"] = layer.renorm_stddev.numpy().reshape(c)
            out[f"plain_moving_variance_{t}"] = plain.moving_variance.numpy().reshape(c)
    x_eval = (rng.normal(size=shape) * 2.0 + 1.0).astype(np.float32)
    out["x_eval"] = x_eval
    out["y_eval"] = layer(tf.constant(x_eval), training=False).numpy()
    meta = {
        "command": command,
        "scenario": name,
        "keras_kwargs": {
            "axis": -1,
            "momentum": MOMENTUM,
            "epsilon": EPSILON,
            "fused": False,
            **kwargs,
            **extra,
        },
        **({"data": data} if data else {}),
        "steps": STEPS,
        "seed": seed,
        "versions": {
            "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    out["__meta__"] = np.array(json.dumps(meta))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("tests/fixtures"))
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SCENARIOS), help="write these scenarios only"
    )
    args = parser.parse_args(argv)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, (shape, kwargs, *data)) in enumerate(SCENARIOS.items()):
        if args.only and name not in args.only:
            continue
        command = COMMAND + (f" --only {' '.join(args.only)}" if args.only else "")
        arrays = run(
            name, shape, kwargs, seed=100 + i, data=data[0] if data else None, command=command
        )
        path = args.out_dir / f"keras_{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
