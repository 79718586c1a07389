"""Gradient accumulation with BatchNorm: the same loop in PyTorch and in bnjax.

A conv-BN-relu x2 net on scikit-learn's digits, 4 micro-batches of 8 per SGD-with-
momentum step, 3 steps. PyTorch runs its usual loop (`(loss / k).backward()` per
micro-batch, `optimizer.step()` every k); bnjax runs `bnjax.training.make_train_step`
(one `lax.scan` over the k micro-batches, `stats_policy="micro"`, PyTorch's numbers)
from the same initial weights. The script prints the largest difference in the
per-micro-batch losses, the final weights and the final running statistics.

    python examples/accumulation_vs_torch.py        # needs torch; exits 0 without it

It also prints what the two other policies would record for the first BatchNorm
(`"corrected"`, `"full"`), which PyTorch has no switch for.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import bnjax
from bnjax import interop, training

ACCUM, MICRO, STEPS, LR, SGD_MOMENTUM = 4, 8, 3, 0.1, 0.9
HI = jax.lax.Precision.HIGHEST


def data():
    digits = load_digits()
    x = (digits.images[: ACCUM * MICRO * STEPS] / 16.0).astype(np.float32)[:, None]  # NCHW
    y = digits.target[: ACCUM * MICRO * STEPS].astype(np.int64)
    return x, y


def torch_run(x, y):
    """PyTorch's accumulation loop; returns the initial state_dict, losses, final state."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    init = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=SGD_MOMENTUM)
    net.train()
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(ACCUM):
            i = (step * ACCUM + micro) * MICRO
            xb, yb = torch.from_numpy(x[i : i + MICRO]), torch.from_numpy(y[i : i + MICRO])
            loss = nn.functional.cross_entropy(net(xb), yb)
            (loss / ACCUM).backward()
            losses.append(loss.item())
        opt.step()
    final = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    return init, np.array(losses), final


def loss_fn(params, batch_stats, batch):
    """The same net, functional and channels-last; keys follow nn.Sequential's indices."""
    x, y = batch
    new, reports = {}, {}  # reports: each BatchNorm's moments, for "corrected"/"full"
    bn_layer = bnjax.batch_norm()  # PyTorch's defaults: momentum 0.1, eps 1e-5
    h = x
    for conv, bn in (("0", "1"), ("3", "4")):
        h = jax.lax.conv_general_dilated(
            h,
            params[conv]["weight"],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=HI,
        )
        h = h + params[conv]["bias"]
        h, moments = bn_layer.normalize(params[bn], batch_stats[bn], h, True)
        new[bn] = bn_layer.update_stats(batch_stats[bn], moments)
        reports[bn] = bn_layer.report(moments)
        h = jax.nn.relu(h)
    logits = jnp.dot(h.mean(axis=(1, 2)), params["8"]["weight"], precision=HI)
    logits = logits + params["8"]["bias"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (new, None, reports)


def bnjax_run(init_sd, x, y, stats_policy="micro"):
    params, batch_stats = jax.tree.map(jnp.asarray, interop.from_torch_state_dict(init_sd))
    opt = optax.sgd(LR, momentum=SGD_MOMENTUM)
    opt_state = opt.init(params)
    step = jax.jit(
        training.make_train_step(loss_fn, opt, accum_steps=ACCUM, stats_policy=stats_policy)
    )
    batches = training.split_micro_batches(
        (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y, jnp.int32)), ACCUM * STEPS
    )
    losses = []
    for s in range(STEPS):
        batch = jax.tree.map(lambda a, s=s: a[s * ACCUM : (s + 1) * ACCUM], batches)
        params, batch_stats, opt_state, metrics = step(params, batch_stats, opt_state, batch)
        losses.append(np.asarray(metrics.loss))
    return np.concatenate(losses), interop.to_torch_state_dict(params, batch_stats)


def main() -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "PyTorch is not installed: nothing to compare against. Install the pinned CPU "
            "build (an unpinned `pip install torch` pulls a multi-GB CUDA build):\n"
            "  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
        )
        return 0
    x, y = data()
    init_sd, torch_losses, torch_final = torch_run(x, y)
    losses, final = bnjax_run(init_sd, x, y)

    print(f"{ACCUM} micro-batches of {MICRO} per SGD step, {STEPS} steps, stats_policy='micro'")
    print(f"  per-micro-batch losses: max |diff| = {np.max(np.abs(losses - torch_losses)):.2e}")
    worst = 0.0
    for key, ref in torch_final.items():
        diff = np.max(np.abs(np.asarray(final[key], np.float64) - ref)) if ref.size else 0.0
        worst = max(worst, float(diff))
        kind = "stats " if "running" in key or "num_batches" in key else "weight"
        print(f"  {kind} {key:22s} max |diff| = {diff:.2e}")
    print(f"largest difference: {worst:.2e}")

    print("\nbn '1' running_mean after the last step, by policy (PyTorch has 'micro'):")
    for policy in ("micro", "corrected", "full"):
        _, sd = bnjax_run(init_sd, x, y, policy)
        print(f"  {policy:9s} {np.array2string(np.asarray(sd['1.running_mean']), precision=5)}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
