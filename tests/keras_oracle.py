"""Replays the Keras fixtures (`scripts/export_keras_fixtures.py`) with bnjax.

Keras's conventions, converted explicitly here (docs/accumulation.md says the same):

- momentum: Keras's is the weight of the old value; bnjax's (PyTorch's) of the new:
  `momentum = 1 - keras_momentum`; renorm's settings come from the preset
  `bnjax.Renorm.keras(renorm_clipping, renorm_momentum)`.
- variance: Keras's unfused layer (`fused=False`, every fixture here but `fused_4d`)
  keeps the biased EMA, bnjax the unbiased one. The
  EMA is linear, so starting bnjax's `running_var` at `n / (n - 1)` (Keras starts at
  1) keeps `running_var == n / (n - 1) * keras_moving_variance` at every step.
  With renorm, Keras's moving variance is `moving_stddev**2 - eps` (an EMA of
  `sqrt(var + eps)`), a Keras-only choice; bnjax keeps PyTorch's update, so the
  fixture also holds a plain Keras layer's moving variance on the same inputs.
- eps: the same placement, `sqrt(var + eps)`, in both (and in renorm's `sigma_B`).
- ghost batches: Keras's ghost g is the strided rows `g, g + G, ...`; bnjax's is the
  contiguous rows `[g V, (g + 1) V)`. `x[perm]`, `perm = arange(N).reshape(V, G).T`
  flattened, gives bnjax Keras's ghosts.
"""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np

import bnjax

FIXTURES = Path(__file__).parent / "fixtures"
F32 = {"rtol": 1e-5, "atol": 1e-5}
F32_PARAM_GRADS = {"rtol": 1e-5, "atol": 5e-5}


def load(name: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(FIXTURES / f"keras_{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays.pop("__meta__")))


def settings(meta: dict) -> dict:
    """bnjax's `apply` options for a fixture's Keras arguments."""
    kw = meta["keras_kwargs"]
    out = {"momentum": round(1 - kw["momentum"], 12), "eps": kw["epsilon"]}
    if kw.get("renorm"):  # Keras's defaults where the fixture leaves them out
        out["renorm"] = bnjax.Renorm.keras(
            kw.get("renorm_clipping"), kw.get("renorm_momentum", 0.99)
        )
    out["virtual_batch_size"] = kw.get("virtual_batch_size")
    return out


def ghost_perm(n: int, vbs: int | None) -> np.ndarray:
    if vbs is None:
        return np.arange(n)
    return np.arange(n).reshape(vbs, n // vbs).T.ravel()


def replay(arrays: dict, meta: dict, *, jit: bool = True) -> list[dict]:
    """Runs the fixture's steps with bnjax; returns per-step results in Keras's layout."""
    opts = settings(meta)
    x0 = arrays["x_0"]
    c, n_batch = x0.shape[-1], x0.shape[0]
    vbs = opts["virtual_batch_size"]
    ghosts = 1 if vbs is None else n_batch // vbs
    n = int(np.prod(x0.shape[:-1])) // ghosts  # values per feature per ghost
    unbias = n / (n - 1)
    params = {"weight": jnp.asarray(arrays["gamma"]), "bias": jnp.asarray(arrays["beta"])}
    _, stats = bnjax.init(c, renorm="renorm" in opts)
    stats["running_var"] = jnp.full((c,), unbias, jnp.float32)
    perm = ghost_perm(n_batch, vbs)
    inv = np.argsort(perm)

    def loss(p, x, s, g):
        y, new = bnjax.apply(p, s, x, True, **opts)
        return jnp.sum(y * g), (y, new)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    grad = jax.jit(grad) if jit else grad
    results = []
    for t in range(meta["steps"]):
        x, g = arrays[f"x_{t}"][perm], arrays[f"g_{t}"][perm]
        (dp, dx), (y, stats) = grad(params, jnp.asarray(x), stats, jnp.asarray(g))
        results.append(
            {
                "y": np.asarray(y)[inv],
                "dx": np.asarray(dx)[inv],
                "dgamma": np.asarray(dp["weight"]),
                "dbeta": np.asarray(dp["bias"]),
                "stats": jax.tree.map(np.asarray, stats),
                "unbias": unbias,
            }
        )
    # Eval: Keras's moving statistics loaded into bnjax's (the conversion is the load).
    last = meta["steps"] - 1
    eval_stats = dict(
        stats,
        running_mean=jnp.asarray(arrays[f"moving_mean_{last}"]),
        running_var=jnp.asarray(arrays[f"moving_variance_{last}"]),
    )
    eval_opts = {k: v for k, v in opts.items() if k != "momentum"}
    y_eval, _ = bnjax.apply(params, eval_stats, jnp.asarray(arrays["x_eval"]), False, **eval_opts)
    results.append({"y_eval": np.asarray(y_eval)})
    return results


def unclipped_corrections(arrays: dict, meta: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Float64 `(r, d)` before clipping at each step, from the fixture alone."""
    opts = settings(meta)
    eps = opts["eps"]
    vbs = opts["virtual_batch_size"]
    out = []
    mu, sigma = np.zeros(arrays["gamma"].shape), np.ones(arrays["gamma"].shape)
    for t in range(meta["steps"]):
        x = arrays[f"x_{t}"].astype(np.float64)
        n_batch = x.shape[0]
        if vbs is not None:  # Keras's strided ghosts, pooled as Keras pools them
            xg = x.reshape((vbs, n_batch // vbs) + x.shape[1:])
            axes = (0,) + tuple(range(2, xg.ndim - 1))
            mean, var = xg.mean(axis=axes).mean(0), xg.var(axis=axes).mean(0)
        else:
            axes = tuple(range(x.ndim - 1))
            mean, var = x.mean(axis=axes), x.var(axis=axes)
        s = np.maximum(sigma, np.sqrt(eps))
        out.append((np.sqrt(var + eps) / s, (mean - mu) / s))
        mu = arrays[f"renorm_mean_{t}"].astype(np.float64)
        sigma = arrays[f"renorm_stddev_{t}"].astype(np.float64)
    return out


def check_against_keras(name: str, *, jit: bool = True) -> None:
    arrays, meta = load(name)
    results = replay(arrays, meta, jit=jit)
    for t, res in enumerate(results[:-1]):
        chex.assert_trees_all_close(res["y"], arrays[f"y_{t}"], **F32)
        chex.assert_trees_all_close(res["dx"], arrays[f"dx_{t}"], **F32)
        chex.assert_trees_all_close(res["dgamma"], arrays[f"dgamma_{t}"], **F32_PARAM_GRADS)
        chex.assert_trees_all_close(res["dbeta"], arrays[f"dbeta_{t}"], **F32_PARAM_GRADS)
        stats = res["stats"]
        chex.assert_trees_all_close(stats["running_mean"], arrays[f"moving_mean_{t}"], **F32)
        # PyTorch's unbiased EMA == n/(n-1) times Keras's biased one (same start, scaled).
        var_ref = arrays.get(f"plain_moving_variance_{t}", arrays[f"moving_variance_{t}"])
        chex.assert_trees_all_close(stats["running_var"], res["unbias"] * var_ref, **F32)
        if "renorm_mean" in stats:
            chex.assert_trees_all_close(stats["renorm_mean"], arrays[f"renorm_mean_{t}"], **F32)
            chex.assert_trees_all_close(stats["renorm_std"], arrays[f"renorm_stddev_{t}"], **F32)
        assert int(stats["num_batches_tracked"]) == t + 1
    chex.assert_trees_all_close(results[-1]["y_eval"], arrays["y_eval"], **F32)
