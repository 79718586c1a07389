"""How many times PyTorch's own float32 rounding a correct bnjax port needs (docs/testing.md).

Usage (needs torch==2.13.0, CPU; about two minutes):

    python scripts/measure_rounding_factor.py

For each model, a fixture with a float64 reference: the three port models of
`scripts/export_port_fixtures.py` exported again here with `float64=True` (into a
temporary folder; the committed port fixtures predate the reference), and
`tests/fixtures/testing_mbnet.npz` as committed. Each is ported (`tests/torch_ports.py`,
`tests/testing_ports.py`) in float32 and in float64 and replayed by
`bnjax.testing.check_model` (2 or 3 SGD steps). Printed per model, dtype and group: the
factor the group needed, max over its arrays of (e - floor) / rounding, where e is the
port's distance from the float64 reference, floor the 8-ulp term and rounding PyTorch's
own float32 error as `compare_rounding` scales it. `ROUNDING_FACTOR` must exceed every
number printed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

for _k, _v in {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}.items():
    os.environ[_k] = _v

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]
import export_port_fixtures as port_script  # noqa: E402
import testing_ports  # noqa: E402
import torch_ports  # noqa: E402

from bnjax import interop, testing  # noqa: E402


def nhwc(x):
    return x.transpose(0, 2, 3, 1)


def export_port_models(out: Path) -> None:
    """`export_port_fixtures.py`'s loop, with the float64 reference."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    gen = torch.Generator().manual_seed(0)
    for name, seed, build, make_x, classes, _ in port_script.MODELS:
        torch.manual_seed(seed)
        model = build()
        port_script._perturb_bn(model, gen)
        x = make_x(gen)
        y = torch.randint(0, classes, (x.shape[0],), generator=gen)
        testing.export_fixture(
            out / name, model, (x,), loss=lambda logits, y=y: F.cross_entropy(logits, y),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=2,
            extra={"labels": y}, command="python scripts/measure_rounding_factor.py",
        )  # fmt: skip


def needed(path: Path, build, to_model) -> dict[str, dict[str, float]]:
    fixture = testing.load_fixture(path)

    def loss(logits, *targets):
        labels = targets[0] if targets else fixture.extra("labels")
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    out = {}
    for dtype in (jnp.float32, jnp.float64):
        model = build(dtype)
        x = fixture.inputs()[0]
        x = (to_model(x) if to_model else x).astype(dtype)
        variables = interop.from_torch(
            fixture.state_dict(), interop.flax_template(model, x, train=False)
        )
        widen = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731, B023
        variables = jax.tree.map(widen, variables)
        runs = [
            testing.check_model(
                fixture,
                model,
                variables,
                loss=loss,
                inputs=to_model,
                optimizer=optax.sgd(0.1, momentum=0.9),
                factor=f,
                raise_on_failure=False,
            )  # fmt: skip
            for f in (0.0, 1.0)
        ]
        factors: dict[str, float] = {}
        for floor, one in zip(runs[0].leaves, runs[1].leaves, strict=True):
            rounding = one.allowed - floor.allowed
            if one.torch_error is None or rounding <= 0:
                continue
            group = one.path.split("/")[0]
            need = max(0.0, one.max_abs_diff - floor.allowed) / rounding
            factors[group] = max(factors.get(group, 0.0), need)
        out[np.dtype(dtype).name] = factors
    return out


def main() -> int:
    jax.config.update("jax_enable_x64", True)
    models = {
        "port_resnet18.npz": (lambda d: torch_ports.ResNet(), nhwc),
        "port_mlp.npz": (lambda d: torch_ports.MLP(), None),
        "port_bn_nobias.npz": (lambda d: torch_ports.NoBiasBNNet(), nhwc),
        "testing_mbnet.npz": (lambda d: testing_ports.MBNet(dtype=d), nhwc),
    }
    with tempfile.TemporaryDirectory() as tmp:
        export_port_models(Path(tmp))
        worst = 0.0
        for name, (build, to_model) in models.items():
            folder = Path(tmp) if name.startswith("port_") else ROOT / "tests" / "fixtures"
            for dtype, factors in needed(folder / name, build, to_model).items():
                worst = max(worst, *factors.values())
                cells = "  ".join(f"{g} {v:5.2f}" for g, v in factors.items())
                print(f"{name:20s} {dtype:8s} {cells}")
    print(f"largest factor needed: {worst:.1f} (ROUNDING_FACTOR = {testing.ROUNDING_FACTOR:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
