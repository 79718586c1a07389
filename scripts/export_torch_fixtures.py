"""Export PyTorch BatchNorm runs as `.npz` fixtures for bnjax's torch-free equivalence tests.

Usage (needs torch==2.13.0, CPU):

    /work/venv-torch/bin/python scripts/export_torch_fixtures.py --out tests/fixtures

Scenarios (one or more files each; see docs/pytorch_interop.md):

  a. `a_grid_<kind>.npz`: BatchNorm1d (N, C) and (N, C, L), BatchNorm2d, BatchNorm3d x
     affine x track_running_stats x momentum {0.1, 0.5, None} x eps {1e-5, 1e-3};
     5 training steps then 2 eval steps, each forward + backward.
  b. `b_walkthrough.npz`: BatchNorm2d(3) trained once on randn(2, 3, 5, 5), evaluated on
     ones(1, 3, 1, 1); then the trained module run with batch sizes 1, 2, 8 in train
     and eval mode (the "results change with the batch size" trap).
  c. `c_accumulation.npz`: gradient accumulation on `SmallNet` (4 micro-batches of 8 per
     SGD-with-momentum step, 3 steps, `(loss / 4).backward()` per micro-batch).
  d. `d_frozen_bn.npz`: `SmallNet` with its BatchNorms in eval() and frozen, the rest
     trained with SGD with momentum, 4 steps.
  e. `e_bf16.npz`: BatchNorm2d with float32 parameters on bfloat16 inputs.

Every file holds a `__meta__` entry: a JSON string with the torch version, the
generating command, the scenario, its configs and the array layout. Arrays are float32
(bfloat16 values are stored as their exact float32 values), int64 for
`num_batches_tracked` and labels, bool for flags. Determinism: fixed seeds, one thread,
`torch.use_deterministic_algorithms(True)`, the scalar ATen kernels
(`ATEN_CPU_CAPABILITY=default`, set before torch is imported), MKL's conditional
numerical reproducibility (`MKL_CBWR=COMPATIBLE`) and oneDNN disabled, so a re-run
reproduces the arrays bit for bit (`tests/test_torch_equivalence.py` checks it).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

# Pinned before torch is imported: they pick kernels at load time.
_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
for _k, _v in _ENV.items():
    os.environ[_k] = _v

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TORCH_VERSION = "2.13.0"
COMMAND = "python scripts/export_torch_fixtures.py --out tests/fixtures"
TRAIN_STEPS = 5
EVAL_STEPS = 2
#: Every file this script writes (tests/fixtures may hold other scripts' files too).
FIXTURE_NAMES = (
    "a_grid_bn1d_nc.npz",
    "a_grid_bn1d_ncl.npz",
    "a_grid_bn2d.npz",
    "a_grid_bn3d.npz",
    "b_walkthrough.npz",
    "c_accumulation.npz",
    "d_frozen_bn.npz",
    "e_bf16.npz",
)


# --------------------------------------------------------------------------- helpers


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy copy; bfloat16 becomes its exact float32 value."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()


def _state_dict(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: _np(v) for k, v in module.state_dict().items()}


def _stack(dicts: list[dict[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    """[{k: a}] per step -> {prefix/k: stacked over steps}."""
    return {f"{prefix}/{k}": np.stack([d[k] for d in dicts]) for k in dicts[0]}


def _prefixed(d: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in d.items()}


def _channel_input(gen: torch.Generator, shape: tuple[int, ...], dtype=torch.float32):
    """Inputs with a non-zero per-channel mean (axis 1) and per-channel scale."""
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    offset = (2.0 + 3.0 * torch.randn(c, generator=gen)).reshape(bshape)
    scale = (0.5 + 2.0 * torch.rand(c, generator=gen)).reshape(bshape)
    return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)


def _randomize_affine(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(1.0 + 0.5 * torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(0.5 * torch.randn(bn.num_features, generator=gen))


def _bn_steps(bn, gen, shape, *, train_flags, dtype=torch.float32) -> dict[str, np.ndarray]:
    """Runs forward + backward once per flag; returns arrays stacked over steps."""
    rec: dict[str, list[np.ndarray]] = {"x": [], "g": [], "y": [], "dx": []}
    if bn.affine:
        rec.update(dweight=[], dbias=[])
    sds = []
    for train in train_flags:
        bn.train(train)
        x = _channel_input(gen, shape, dtype).requires_grad_(True)
        bn.zero_grad(set_to_none=True)
        y = bn(x)
        g = torch.randn(y.shape, generator=gen).to(y.dtype)
        y.backward(g)
        rec["x"].append(_np(x))
        rec["g"].append(_np(g))
        rec["y"].append(_np(y))
        rec["dx"].append(_np(x.grad))
        if bn.affine:
            rec["dweight"].append(_np(bn.weight.grad))
            rec["dbias"].append(_np(bn.bias.grad))
        sds.append(_state_dict(bn))
    out = {k: np.stack(v) for k, v in rec.items()}
    out["train"] = np.asarray(train_flags, bool)
    out.update(_stack(sds, "sd"))
    return out


def _save(out: Path, name: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    assert name in FIXTURE_NAMES, name
    meta = dict(
        meta,
        torch_version=torch.__version__,
        command=COMMAND,
        script="scripts/export_torch_fixtures.py",
        determinism=_ENV_META,
    )
    payload = {"__meta__": np.asarray(json.dumps(meta, sort_keys=True))}
    payload.update(arrays)
    np.savez_compressed(out / name, **payload)


_ENV_META = dict(
    _ENV,
    seeds="fixed per scenario/config",
    threads=1,
    deterministic_algorithms=True,
    mkldnn_enabled=False,
)


# --------------------------------------------------------------------------- scenario a

GRID_KINDS = {
    # name: (module class, input shape); C = 3 everywhere, small shapes.
    "bn1d_nc": (nn.BatchNorm1d, (8, 3)),
    "bn1d_ncl": (nn.BatchNorm1d, (4, 3, 5)),
    "bn2d": (nn.BatchNorm2d, (4, 3, 3, 3)),
    "bn3d": (nn.BatchNorm3d, (2, 3, 2, 3, 3)),
}


def scenario_a(out: Path) -> None:
    flags = [True] * TRAIN_STEPS + [False] * EVAL_STEPS
    seed = 1000
    for kind, (cls, shape) in GRID_KINDS.items():
        arrays: dict[str, np.ndarray] = {}
        configs = []
        grid = itertools.product([True, False], [True, False], [0.1, 0.5, None], [1e-5, 1e-3])
        for i, (affine, track, momentum, eps) in enumerate(grid):
            seed += 1
            gen = torch.Generator().manual_seed(seed)
            bn = cls(shape[1], eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
            _randomize_affine(bn, gen)
            cid = f"cfg{i:02d}"
            arrays.update(_prefixed(_state_dict(bn), f"{cid}/sd0"))
            arrays.update(_prefixed(_bn_steps(bn, gen, shape, train_flags=flags), cid))
            configs.append(
                dict(
                    id=cid,
                    module=cls.__name__,
                    num_features=shape[1],
                    input_shape=list(shape),
                    affine=affine,
                    track_running_stats=track,
                    momentum=momentum,
                    eps=eps,
                    seed=seed,
                    train_steps=TRAIN_STEPS,
                    eval_steps=EVAL_STEPS,
                )
            )
        meta = dict(
            scenario="a",
            kind=kind,
            configs=configs,
            description=f"{cls.__name__} on inputs {shape} (NC...): grid over affine x "
            "track_running_stats x momentum x eps; per config TRAIN_STEPS training steps "
            "then EVAL_STEPS eval steps, each forward + backward with a random upstream "
            "gradient g.",
            layout="<cfg>/sd0/<key>: state_dict before step 0; per step s (leading axis): "
            "<cfg>/x, g, y, dx, [dweight, dbias], train (bool), sd/<key> (state_dict "
            "after the step).",
        )
        _save(out, f"a_grid_{kind}.npz", meta, arrays)


# --------------------------------------------------------------------------- scenario b


def scenario_b(out: Path) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    arrays: dict[str, np.ndarray] = _prefixed(_state_dict(bn), "sd0")
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    y = bn(x)
    g = torch.randn(y.shape)
    y.backward(g)
    arrays.update(
        {
            "train/x": _np(x),
            "train/g": _np(g),
            "train/y": _np(y),
            "train/dx": _np(x.grad),
            "train/dweight": _np(bn.weight.grad),
            "train/dbias": _np(bn.bias.grad),
        }
    )
    arrays.update(_prefixed(_state_dict(bn), "sd1"))
    trained = copy.deepcopy(bn)

    bn.eval()
    ones = torch.ones(1, 3, 1, 1, requires_grad=True)
    bn.zero_grad(set_to_none=True)
    y1 = bn(ones)
    y1.backward(torch.ones_like(y1))
    arrays.update(
        {"eval_ones/x": _np(ones), "eval_ones/y": _np(y1), "eval_ones/dx": _np(ones.grad)}
    )

    pool = 1.0 + 2.0 * torch.randn(8, 3, 5, 5)
    cases = []
    for bs, train in itertools.product([1, 2, 8], [True, False]):
        m = copy.deepcopy(trained)
        m.train(train)
        xb = pool[:bs].clone().requires_grad_(True)
        yb = m(xb)
        gb = torch.randn(yb.shape)
        yb.backward(gb)
        cid = f"bs{bs}_{'train' if train else 'eval'}"
        cases.append(dict(id=cid, batch_size=bs, train=train))
        arrays.update(
            {
                f"{cid}/x": _np(xb),
                f"{cid}/g": _np(gb),
                f"{cid}/y": _np(yb),
                f"{cid}/dx": _np(xb.grad),
                f"{cid}/dweight": _np(m.weight.grad),
                f"{cid}/dbias": _np(m.bias.grad),
            }
        )
        arrays.update(_prefixed(_state_dict(m), f"{cid}/sd"))
    meta = dict(
        scenario="b",
        cases=cases,
        config=dict(module="BatchNorm2d", num_features=3, momentum=0.1, eps=1e-5, seed=0),
        description="The classic walkthrough: BatchNorm2d(3) trained once on randn(2,3,5,5) "
        "(train/*), then eval() on ones(1,3,1,1) (eval_ones/*, upstream grad ones). Then "
        "copies of the once-trained module (state sd1) run on the first bs rows of one "
        "pool of inputs with bs in {1, 2, 8}, in train and eval mode (bs<bs>_<mode>/*): "
        "train outputs for the same sample change with the batch, eval outputs do not.",
        layout="sd0/<key>, sd1/<key>: state_dict before/after the training step; "
        "<case>/x, g, y, dx, dweight, dbias, sd/<key> (state_dict after the case).",
    )
    _save(out, "b_walkthrough.npz", meta, arrays)


# --------------------------------------------------------------------------- scenarios c, d


class SmallNet(nn.Module):
    """conv-BN-relu, conv-BN-relu, global average pool, linear; input (N, 1, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(123))
    return x[perm], y[perm]


def _grads(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: _np(p.grad) for k, p in net.named_parameters() if p.grad is not None}


ACCUM_STEPS = 4
MICRO_BATCH = 8
OPT_STEPS = 3
LR = 0.1
SGD_MOMENTUM = 0.9


def scenario_c(out: Path, data) -> None:
    x_all, y_all = data
    n = ACCUM_STEPS * MICRO_BATCH * OPT_STEPS
    x, y = x_all[:n], y_all[:n]
    torch.manual_seed(0)
    net = SmallNet()
    arrays = _prefixed(_state_dict(net), "sd_init")
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=SGD_MOMENTUM)
    net.train()
    opt.zero_grad()
    losses, logits, micro_sds, step_sds, step_grads = [], [], [], [], []
    for step in range(OPT_STEPS):
        for micro in range(ACCUM_STEPS):
            i = (step * ACCUM_STEPS + micro) * MICRO_BATCH
            out_ = net(x[i : i + MICRO_BATCH])
            loss = F.cross_entropy(out_, y[i : i + MICRO_BATCH])
            (loss / ACCUM_STEPS).backward()
            losses.append(_np(loss))
            logits.append(_np(out_))
            micro_sds.append(_state_dict(net))
        step_grads.append(_grads(net))
        opt.step()
        opt.zero_grad()
        step_sds.append(_state_dict(net))
    arrays.update({"x": _np(x), "y": _np(y), "loss": np.stack(losses), "logits": np.stack(logits)})
    arrays.update(_stack(micro_sds, "sd_micro"))
    arrays.update(_stack(step_grads, "grad_step"))
    arrays.update(_stack(step_sds, "sd_step"))
    arrays.update(_prefixed(step_sds[-1], "sd_final"))
    meta = dict(
        scenario="c",
        config=dict(
            net="SmallNet",
            micro_batch=MICRO_BATCH,
            accum_steps=ACCUM_STEPS,
            optimizer_steps=OPT_STEPS,
            optimizer="SGD",
            lr=LR,
            momentum=SGD_MOMENTUM,
            dampening=0.0,
            nesterov=False,
            weight_decay=0.0,
            loss="cross_entropy (mean over the micro-batch)",
            backward="(loss / accum_steps).backward() per micro-batch",
            zero_grad_and_step="every accum_steps micro-batches",
            bn="train mode: running stats updated at every micro-batch forward",
            data="sklearn digits / 16, shuffled with seed 123, first N rows",
            init_seed=0,
        ),
        description="Gradient accumulation on SmallNet (conv1-bn1-relu, conv2-bn2-relu, "
        "mean over H, W, fc). Micro-batch k uses rows [8k, 8k + 8) of x (NCHW).",
        layout="x (N,1,8,8) NCHW, y (N,) int64; loss (micro,), logits (micro, 8, 10) "
        "unscaled; sd_init/<key>; sd_micro/<key> (micro, ...) after each micro-batch "
        "forward+backward; grad_step/<key> (steps, ...) accumulated .grad before each "
        "opt.step(); sd_step/<key> (steps, ...) after each step; sd_final/<key>.",
    )
    _save(out, "c_accumulation.npz", meta, arrays)


FROZEN_STEPS = 4
FROZEN_BATCH = 16
WARMUP_BATCHES = 3


def scenario_d(out: Path, data) -> None:
    x_all, y_all = data
    start = ACCUM_STEPS * MICRO_BATCH * OPT_STEPS  # rows after scenario c's
    torch.manual_seed(1)
    net = SmallNet()
    gen = torch.Generator().manual_seed(7)
    # A "pretrained" BatchNorm: running statistics from a few batches, non-trivial affine.
    warm = x_all[start : start + WARMUP_BATCHES * FROZEN_BATCH]
    net.train()
    with torch.no_grad():
        for b in range(WARMUP_BATCHES):
            net(warm[b * FROZEN_BATCH : (b + 1) * FROZEN_BATCH])
    for bn in (net.bn1, net.bn2):
        _randomize_affine(bn, gen)
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    arrays = _prefixed(_state_dict(net), "sd_init")
    start += WARMUP_BATCHES * FROZEN_BATCH
    x = x_all[start : start + FROZEN_STEPS * FROZEN_BATCH]
    y = y_all[start : start + FROZEN_STEPS * FROZEN_BATCH]
    opt = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad], lr=LR, momentum=SGD_MOMENTUM
    )
    net.train()
    net.bn1.eval()
    net.bn2.eval()
    losses, logits, sds, grads = [], [], [], []
    for step in range(FROZEN_STEPS):
        i = step * FROZEN_BATCH
        opt.zero_grad()
        out_ = net(x[i : i + FROZEN_BATCH])
        loss = F.cross_entropy(out_, y[i : i + FROZEN_BATCH])
        loss.backward()
        grads.append(_grads(net))
        opt.step()
        losses.append(_np(loss))
        logits.append(_np(out_))
        sds.append(_state_dict(net))
    arrays.update({"x": _np(x), "y": _np(y), "loss": np.stack(losses), "logits": np.stack(logits)})
    arrays.update(_stack(grads, "grad_step"))
    arrays.update(_stack(sds, "sd_step"))
    meta = dict(
        scenario="d",
        config=dict(
            net="SmallNet",
            batch=FROZEN_BATCH,
            steps=FROZEN_STEPS,
            optimizer="SGD",
            lr=LR,
            momentum=SGD_MOMENTUM,
            trained="conv1, conv2, fc",
            frozen="bn1, bn2: eval() and weight/bias requires_grad=False",
            warmup=f"{WARMUP_BATCHES} train-mode no_grad batches of {FROZEN_BATCH} "
            "fill the running stats, then BN weight/bias are randomized (seed 7)",
            init_seed=1,
            data="sklearn digits / 16, shuffled with seed 123, rows "
            "after scenario c's and the warm-up's",
        ),
        description="Frozen-BatchNorm fine-tuning of SmallNet: BN normalizes with its "
        "running statistics and is never updated; the rest trains with SGD + momentum.",
        layout="x (steps*16,1,8,8) NCHW, y int64; loss (steps,), logits (steps, 16, 10); "
        "sd_init/<key>; grad_step/<key> (steps, ...) .grad of the trained parameters; "
        "sd_step/<key> (steps, ...) state_dict after each step.",
    )
    _save(out, "d_frozen_bn.npz", meta, arrays)


# --------------------------------------------------------------------------- scenario e


def scenario_e(out: Path) -> None:
    shape = (4, 4, 3, 3)
    gen = torch.Generator().manual_seed(2024)
    bn = nn.BatchNorm2d(shape[1])
    _randomize_affine(bn, gen)
    arrays = _prefixed(_state_dict(bn), "sd0")
    flags = [True] * TRAIN_STEPS + [False] * EVAL_STEPS
    arrays.update(_bn_steps(bn, gen, shape, train_flags=flags, dtype=torch.bfloat16))
    meta = dict(
        scenario="e",
        config=dict(
            module="BatchNorm2d",
            num_features=shape[1],
            input_shape=list(shape),
            momentum=0.1,
            eps=1e-5,
            param_dtype="float32",
            x_dtype="bfloat16",
            train_steps=TRAIN_STEPS,
            eval_steps=EVAL_STEPS,
            seed=2024,
        ),
        description="Mixed precision: float32 BatchNorm2d parameters and running stats, "
        "bfloat16 inputs and upstream gradients; y and dx come back in bfloat16, "
        "dweight/dbias and the running stats in float32.",
        layout="sd0/<key>; per step (leading axis): x, g, y, dx (bfloat16 values stored "
        "exactly as float32), dweight, dbias (float32), train, sd/<key>.",
    )
    _save(out, "e_bf16.npz", meta, arrays)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tests/fixtures"),
        help="directory to write the .npz files to (created if missing)",
    )
    args = parser.parse_args(argv)
    if torch.__version__.split("+")[0] != TORCH_VERSION:
        print(
            f"error: the fixtures are pinned to torch=={TORCH_VERSION}, found {torch.__version__}",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    args.out.mkdir(parents=True, exist_ok=True)
    data = _digits()
    scenario_a(args.out)
    scenario_b(args.out)
    scenario_c(args.out, data)
    scenario_d(args.out, data)
    scenario_e(args.out)
    for name in FIXTURE_NAMES:
        print(f"{(args.out / name).stat().st_size:>9d}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
