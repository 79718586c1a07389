"""Export the PyTorch fixtures of the layer-pairing tests (`tests/test_port_pairing.py`).

Usage (needs torch==2.13.0, CPU):

    python scripts/export_pairing_fixtures.py --out tests/fixtures

Writes `pairing_shortcut.npz` and `pairing_se.npz` (models in
`scripts/torch_pairing_models.py`): for float32 and float64 (`f32/`, `f64/`, each
model built in its dtype, so float64 values are not float32's), the state_dict in
torch's registration order (`<dtype>/state_dict/<key>`), the input
(`x`, NCHW, float64 values rounded to float32 so both dtypes see the same numbers),
the eval-mode logits (`<dtype>/eval`) and the train-mode logits of the same batch
(`<dtype>/train`). `__meta__` is a JSON string: the torch version, this command, the
environment and a description. Determinism as in `export_torch_fixtures.py`: fixed
seeds, one thread, deterministic algorithms, the scalar ATen kernels, no oneDNN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Pinned before torch is imported: they pick kernels at load time.
_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
for _k, _v in _ENV.items():
    os.environ[_k] = _v

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_pairing_models import build  # noqa: E402

TORCH_VERSION = "2.13.0"
COMMAND = "python scripts/export_pairing_fixtures.py --out tests/fixtures"
FIXTURES = {
    "pairing_shortcut.npz": ("shortcut", (2, 3, 6, 6)),
    "pairing_se.npz": ("se", (2, 3, 6, 6)),
}
DESCRIPTION = {
    "shortcut": "ShortcutNet: stem conv+BN, 12 torchvision BasicBlocks with a conv1x1+BN "
    "downsample (registered and called last), mean pool, Linear; BN affine and running "
    "statistics perturbed per layer",
    "se": "SENet: stem conv+BN, 3 blocks of conv, BN, squeeze-excitation with 1x1 Conv2d "
    "(torchvision.ops.SqueezeExcitation), mean pool, Linear",
}


def export(name: str, model_name: str, shape: tuple[int, ...], out: Path) -> None:
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float32)
    arrays: dict[str, np.ndarray] = {"x": x.numpy()}
    for tag, dtype in (("f32", torch.float32), ("f64", torch.float64)):
        # Built in the dtype itself: float64 weights and statistics that float32 cannot
        # hold, so a port that narrows anything shows in the float64 outputs.
        torch.set_default_dtype(dtype)
        try:
            model = build(model_name)
        finally:
            torch.set_default_dtype(torch.float32)
        for k, v in model.state_dict().items():
            arrays[f"{tag}/state_dict/{k}"] = v.detach().numpy().copy()
        with torch.no_grad():
            arrays[f"{tag}/eval"] = model.eval()(x.to(dtype)).numpy()
            arrays[f"{tag}/train"] = model.train()(x.to(dtype)).numpy()
    meta = {
        "torch": torch.__version__,
        "command": COMMAND,
        "env": _ENV,
        "model": model_name,
        "description": DESCRIPTION[model_name],
        "layout": "x NCHW; <f32|f64>/state_dict/<key> (registration order), "
        "<f32|f64>/eval and /train logits",
    }
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(out / name, **arrays)
    print(f"wrote {out / name} ({len(arrays)} arrays)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = parser.parse_args()
    if torch.__version__.split("+")[0] != TORCH_VERSION:
        print(f"warning: fixtures are pinned to torch=={TORCH_VERSION}, found {torch.__version__}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (model_name, shape) in FIXTURES.items():
        export(name, model_name, shape, args.out)


if __name__ == "__main__":
    main()
