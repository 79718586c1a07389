"""An independent NumPy float64 reference for BatchNorm, written from PyTorch's docs.

It shares no code with bnjax: expected values in the tests come from here, from
PyTorch fixtures, or from closed forms. Two-pass variance in float64, loops over
steps in plain Python.
"""

from __future__ import annotations

import numpy as np


def ref_moments(x, axes, mask=None):
    """Per-feature mean, biased var and count of `x` (float64), `axes` = feature axes."""
    x = np.asarray(x, np.float64)
    axes = tuple(sorted(a % x.ndim for a in axes))
    moved = np.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    feat = moved.shape[x.ndim - len(axes) :]
    flat = moved.reshape(-1, *feat)
    if mask is not None:
        flat = flat[np.asarray(mask).reshape(-1)]
    n = flat.shape[0]
    if n == 0:
        return np.zeros(feat), np.zeros(feat), 0
    mean = flat.mean(axis=0)
    var = ((flat - mean) ** 2).mean(axis=0)
    return mean, var, n


def _bcast(v, ndim, axes):
    axes = tuple(sorted(a % ndim for a in axes))
    shape = [1] * ndim
    for a, d in zip(axes, np.shape(v), strict=True):
        shape[a] = d
    return np.reshape(v, shape)


def ref_batchnorm(x, weight, bias, state, *, train, momentum=0.1, eps=1e-5, axes=(-1,), mask=None):
    """One BatchNorm call, as torch.nn.functional.batch_norm computes it, in float64.

    `state` is None (no tracked stats) or a dict with running_mean, running_var,
    num_batches_tracked (NumPy). Returns `(y, new_state)`.
    """
    x64 = np.asarray(x, np.float64)
    axes = tuple(a % x64.ndim for a in axes)
    if train or state is None:
        mean, var, n = ref_moments(x64, axes, mask)
    else:
        mean, var = state["running_mean"], state["running_var"]
        n = None
    y = (x64 - _bcast(mean, x64.ndim, axes)) / np.sqrt(_bcast(var, x64.ndim, axes) + eps)
    if weight is not None:
        y = y * _bcast(np.asarray(weight, np.float64), x64.ndim, axes)
    if bias is not None:
        y = y + _bcast(np.asarray(bias, np.float64), x64.ndim, axes)
    if not train or state is None:
        return y, state
    nbt = int(state["num_batches_tracked"]) + 1
    m = 1.0 / nbt if momentum is None else momentum
    new = dict(state, num_batches_tracked=nbt)
    if n >= 2:
        rm = np.asarray(state["running_mean"], np.float64)
        rv = np.asarray(state["running_var"], np.float64)
        new["running_mean"] = (1 - m) * rm + m * mean
        new["running_var"] = (1 - m) * rv + m * var * n / (n - 1)
    return y, new


def ref_grads(x, weight, g, *, axes=(-1,), eps=1e-5):
    """Closed-form training-mode BatchNorm gradients (dx, dweight, dbias), float64.

    dx = w / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat)).
    """
    x = np.asarray(x, np.float64)
    g = np.asarray(g, np.float64)
    axes = tuple(a % x.ndim for a in axes)
    red = tuple(a for a in range(x.ndim) if a not in axes)
    mean, var, _ = ref_moments(x, axes)
    inv = 1 / np.sqrt(_bcast(var, x.ndim, axes) + eps)
    xhat = (x - _bcast(mean, x.ndim, axes)) * inv
    w = np.ones(mean.shape) if weight is None else np.asarray(weight, np.float64)
    dbias = g.sum(axis=red)
    dweight = (g * xhat).sum(axis=red)
    gm = g.mean(axis=red, keepdims=True)
    gxm = (g * xhat).mean(axis=red, keepdims=True)
    dx = _bcast(w, x.ndim, axes) * inv * (g - gm - xhat * gxm)
    return dx, dweight, dbias
