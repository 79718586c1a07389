"""Synchronized BatchNorm on 8 simulated CPU devices, checked against one device.

Run by `tests/test_distributed.py` in a subprocess (jax must see 8 devices before it
starts, which a pytest process that already imported jax cannot arrange):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_distributed_checks.py

Every check compares a multi-device run with the same computation on one device
(`bnjax.apply` on the full batch) and with the independent NumPy float64 reference
in `tests/reference.py`. Results are printed one line per check and, with
`--json PATH`, written as JSON; the exit status is 1 if any check fails.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from reference import ref_batchnorm, ref_grads, ref_moments  # noqa: E402

import bnjax  # noqa: E402

NDEV = 8
C = 4
# float32 tolerances. Against one device the same float32 maths runs in a different
# summation order (per-shard partial sums, then a psum), so differences are a few ulps
# of the values involved (|x| ~ 10, outputs ~ 3, grads ~ 10): atol 1e-4 is ~100 ulps
# of headroom. Against the float64 reference the float32 rounding itself is included.
ATOL_DEVICE = 1e-4
ATOL_REF = 2e-4

CHECKS: dict[str, Callable[[], dict[str, float]]] = {}


def check(fn: Callable[[], dict[str, float]]) -> Callable[[], dict[str, float]]:
    CHECKS[fn.__name__] = fn
    return fn


class Mismatch(AssertionError):
    pass


def maxdiff(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"shape {got.shape} != expected {want.shape}")
    return float(np.max(np.abs(got - want))) if got.size else 0.0


def compare(diffs: dict[str, float], name: str, got, want, atol: float) -> None:
    d = maxdiff(got, want)
    diffs[name] = d
    if not d <= atol:
        raise Mismatch(f"{name}: max abs difference {d:.3g} > tolerance {atol:g}")


# --- shared data -----------------------------------------------------------------------

rng = np.random.default_rng(0)
B = 32  # global batch, 4 rows per device
X = (rng.normal(size=(B, 3, C)) * rng.uniform(0.5, 3.0, C) + rng.normal(0, 5, C)).astype(np.float32)
G = rng.normal(size=X.shape).astype(np.float32)  # fixed cotangent: loss = sum(y * G)
PARAMS = {
    "weight": jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=C), jnp.float32),
}
STATS = {
    "running_mean": jnp.asarray(rng.normal(size=C), jnp.float32),
    "running_var": jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32),
    "num_batches_tracked": jnp.asarray(3, jnp.int32),
}
NP_STATS = {k: np.asarray(v) for k, v in STATS.items()}


def np_tree(tree):
    return jax.tree.map(np.asarray, tree)


@jax.jit
def single_device(params, batch_stats, x, g):
    """The single-device truth: forward, running stats and grads on the full batch."""

    def loss(params, x):
        y, new_stats = bnjax.apply(params, batch_stats, x, True)
        return jnp.sum(y * g), (y, new_stats)

    (_, (y, new_stats)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return y, new_stats, gp, gx


def compare_full(diffs, got_y, got_stats, got_gp, got_gx, x=X, g=G):
    """Compare a full-batch result with one device and with the float64 reference."""
    y1, s1, gp1, gx1 = np_tree(single_device(PARAMS, STATS, jnp.asarray(x), jnp.asarray(g)))
    compare(diffs, "y vs 1 device", got_y, y1, ATOL_DEVICE)
    compare(diffs, "dx vs 1 device", got_gx, gx1, ATOL_DEVICE)
    for k in ("weight", "bias"):
        compare(diffs, f"d{k} vs 1 device", got_gp[k], gp1[k], ATOL_DEVICE)
    for k in ("running_mean", "running_var"):
        compare(diffs, f"{k} vs 1 device", got_stats[k], s1[k], ATOL_DEVICE)
    if int(got_stats["num_batches_tracked"]) != int(NP_STATS["num_batches_tracked"]) + 1:
        raise Mismatch(f"num_batches_tracked = {got_stats['num_batches_tracked']}")
    w, b = np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"])
    y_ref, s_ref = ref_batchnorm(x, w, b, NP_STATS, train=True)
    dx_ref, dw_ref, db_ref = ref_grads(x, w, g)
    compare(diffs, "y vs float64 ref", got_y, y_ref, ATOL_REF)
    compare(diffs, "dx vs float64 ref", got_gx, dx_ref, ATOL_REF)
    compare(diffs, "dweight vs float64 ref", got_gp["weight"], dw_ref, ATOL_REF * 10)
    compare(diffs, "dbias vs float64 ref", got_gp["bias"], db_ref, ATOL_REF * 10)
    for k in ("running_mean", "running_var"):
        compare(diffs, f"{k} vs float64 ref", got_stats[k], s_ref[k], ATOL_REF)


def data_mesh(axis_type: AxisType = AxisType.Explicit) -> Mesh:
    """One "data" axis over the NDEV devices (`jax.make_mesh`'s default: Explicit)."""
    return jax.make_mesh((NDEV,), ("data",), axis_types=(axis_type,))


def put(mesh: Mesh, spec: P, *trees):
    """`jax.device_put` every leaf with `NamedSharding(mesh, spec)`."""
    sharding = NamedSharding(mesh, spec)
    out = tuple(jax.tree.map(lambda a: jax.device_put(jnp.asarray(a), sharding), t) for t in trees)
    return out if len(out) > 1 else out[0]


# --- 1. shard_map / pmap / vmap with axis_name == one device -----------------------------


@check
def shard_map_axis_name() -> dict[str, float]:
    """shard_map over 8 devices, stats synced over 'data', grads of the global loss."""
    mesh = data_mesh()
    x, g = put(mesh, P("data"), X, G)
    params, stats = put(mesh, P(), PARAMS), put(mesh, P(), STATS)

    def local(params, batch_stats, x):
        return bnjax.apply(params, batch_stats, x, True, axis_name="data")

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())
    )

    @jax.jit
    def step(params, x, g):
        def loss(params, x):
            y, new_stats = sharded(params, stats, x)
            return jnp.sum(y * g), (y, new_stats)

        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return y, s, gp, gx

    y, s, gp, gx = step(params, x, g)
    diffs: dict[str, float] = {}
    compare_full(diffs, *np_tree((y, s, gp, gx)))
    return diffs


@check
def shard_map_grad_inside() -> dict[str, float]:
    """The data-parallel pattern: per-device loss and grad inside shard_map, then psum."""
    mesh = data_mesh()
    x, g = put(mesh, P("data"), X, G)

    def local(params, batch_stats, x, g):
        def loss(params, x):
            y, new_stats = bnjax.apply(params, batch_stats, x, True, axis_name="data")
            return jnp.sum(y * g), (y, new_stats)

        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        # Parameter grads are invariant across 'data' already when shard_map tracks
        # varying values (check_vma=True): the transpose of the implicit broadcast of
        # the replicated params is a psum.
        return y, s, gp, gx

    step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P("data"), P(), P(), P("data")),
        )
    )
    diffs: dict[str, float] = {}
    compare_full(diffs, *np_tree(step(PARAMS, STATS, x, g)))
    return diffs


@check
def pmap_axis_name() -> dict[str, float]:
    """pmap over 8 devices; per-device grads, parameter grads psum'd."""

    def local(params, batch_stats, x, g):
        def loss(params, x):
            y, new_stats = bnjax.apply(params, batch_stats, x, True, axis_name="i")
            return jnp.sum(y * g), (y, new_stats)

        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return y, s, jax.lax.psum(gp, "i"), gx

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = jax.pmap(local, axis_name="i", in_axes=(None, None, 0, 0))
        y, s, gp, gx = np_tree(
            step(PARAMS, STATS, X.reshape(NDEV, -1, 3, C), G.reshape(NDEV, -1, 3, C))
        )
    for w in caught:
        print(f"  note: pmap warned: {w.category.__name__}: {w.message}")
    diffs: dict[str, float] = {}
    for k in ("running_mean", "running_var"):
        diffs[f"{k} spread across devices"] = maxdiff(s[k], np.broadcast_to(s[k][0], s[k].shape))
    s0 = {k: v[0] for k, v in s.items()}
    gp0 = {k: v[0] for k, v in gp.items()}
    compare_full(diffs, y.reshape(X.shape), s0, gp0, gx.reshape(X.shape))
    if max(v for k, v in diffs.items() if "spread" in k) != 0.0:
        raise Mismatch(f"devices disagree on running stats: {diffs}")
    return diffs


@check
def vmap_axis_name_per_example() -> dict[str, float]:
    """vmap over examples with 1-D per-example x (C,) and axis_name == full batch."""
    x2 = X.reshape(-1, C)  # (B*3, C): every row an example
    g2 = G.reshape(-1, C)

    @jax.jit
    def step(params, x, g):
        def loss(params, x):
            y, s = jax.vmap(
                lambda xi: bnjax.apply(params, STATS, xi, True, axis_name="ex"),
                axis_name="ex",
            )(x)
            return jnp.sum(y * g), (y, jax.tree.map(lambda v: v[0], s))

        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return y, s, gp, gx

    diffs: dict[str, float] = {}
    compare_full(diffs, *np_tree(step(PARAMS, jnp.asarray(x2), jnp.asarray(g2))), x=x2, g=g2)
    return diffs


@check
def vmap_inside_devices_nested_axes() -> dict[str, float]:
    """vmap over examples inside pmap / shard_map; sync over both names at once.

    jax 0.10.2's shard_map cannot mix a vmap axis into a collective while it tracks
    varying values (`check_vma=True` raises in `psum`), so that path runs with
    `check_vma=False`; pmap needs nothing special.
    """
    mesh = data_mesh()

    def local(x):
        y, s = jax.vmap(
            lambda xi: bnjax.apply(PARAMS, STATS, xi, True, axis_name=("data", "ex")),
            axis_name="ex",
        )(x)
        return y, jax.tree.map(lambda v: v[0], s)

    on_mesh = jax.shard_map(
        local, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P()), check_vma=False
    )
    y_sm, s_sm = np_tree(jax.jit(on_mesh)(put(mesh, P("data"), X)))
    y_pm, s_pm = np_tree(jax.pmap(local, axis_name="data")(X.reshape(NDEV, -1, 3, C)))
    y_ref, s_ref = ref_batchnorm(
        X, np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"]), NP_STATS, train=True
    )
    diffs: dict[str, float] = {}
    for tag, y, s in (("shard_map", y_sm, s_sm), ("pmap", y_pm.reshape(X.shape), s_pm)):
        s = s if tag == "shard_map" else {k: v[0] for k, v in s.items()}
        compare(diffs, f"{tag}: y vs float64 ref", y, y_ref, ATOL_REF)
        for k in ("running_mean", "running_var"):
            compare(diffs, f"{tag}: {k} vs float64 ref", s[k], s_ref[k], ATOL_REF)
    return diffs


# --- 2. unequal shards via mask == global statistics of the valid elements ---------------


@check
def shard_map_unequal_masked_shards() -> dict[str, float]:
    """Shards with 4, 3, 0, 1, 4, 2, 1, 4 valid rows: global stats of the valid rows."""
    mesh = data_mesh()
    valid_rows = [4, 3, 0, 1, 4, 2, 1, 4]
    per = B // NDEV
    mask = np.zeros((B, 3), bool)
    for d, k in enumerate(valid_rows):
        mask[d * per : d * per + k] = True
    mask[5, 1] = False  # and one hole inside a row
    x, m = put(mesh, P("data"), X, mask)

    def local(params, batch_stats, x, mask):
        y, s = bnjax.apply(params, batch_stats, x, True, axis_name="data", mask=mask)
        moments = bnjax.batch_moments(x, mask=mask, axis_name="data")
        return y, s, moments.count

    y, s, count = np_tree(
        jax.jit(
            jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(P(), P(), P("data"), P("data")),
                out_specs=(P("data"), P(), P()),
            )
        )(PARAMS, STATS, x, m)
    )
    w, b = np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"])
    y_ref, s_ref = ref_batchnorm(X, w, b, NP_STATS, train=True, mask=mask)
    _, _, n_ref = ref_moments(X, (-1,), mask)
    diffs: dict[str, float] = {}
    if int(count) != n_ref:
        raise Mismatch(f"global valid count {int(count)} != {n_ref}")
    diffs["count"] = 0.0
    compare(diffs, "y (all positions) vs float64 ref", y, y_ref, ATOL_REF)
    for k in ("running_mean", "running_var"):  # running_var uses the global n - 1
        compare(diffs, f"{k} vs float64 ref", s[k], s_ref[k], ATOL_REF)
    # And the single-device masked apply on the global batch agrees too.
    y1, s1 = np_tree(jax.jit(bnjax.apply, static_argnums=3)(PARAMS, STATS, X, True, mask=mask))
    compare(diffs, "y vs 1 device", y, y1, ATOL_DEVICE)
    for k in ("running_mean", "running_var"):
        compare(diffs, f"{k} vs 1 device", s[k], s1[k], ATOL_DEVICE)
    return diffs


@check
def shard_map_masked_padding_shard() -> dict[str, float]:
    """A shard that is all padding (value 1e6, mask False) changes nothing; grads too.

    The padding must not leak into the statistics, nor into the shift the one-pass
    variance uses (a shift pulled towards 1e6 would cancel catastrophically).
    """
    mesh = data_mesh()
    per = B // NDEV
    mask = np.ones((B, 3), bool)
    mask[2 * per : 3 * per] = False  # device 2: nothing valid
    mask[5 * per + 1 :] = False  # devices 5..7: one row, then nothing
    xp = X.copy()
    xp[~mask] = 1e6
    g = np.where(mask[..., None], G, 0).astype(np.float32)
    x_s, m_s, g_s = put(mesh, P("data"), xp, mask, g)

    def loss_fn(apply_fn):
        def loss(params, x, mask, g):
            y, s = apply_fn(params, STATS, x, mask)
            return jnp.sum(y * g), (y, s)

        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))

    sharded = jax.shard_map(
        lambda p, st, x, m: bnjax.apply(p, st, x, True, axis_name="data", mask=m),
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P("data"), P()),
    )
    (_, (y, s)), (gp, gx) = np_tree(loss_fn(sharded)(PARAMS, x_s, m_s, g_s))
    single = lambda p, st, x, m: bnjax.apply(p, st, x, True, mask=m)  # noqa: E731
    (_, (y1, s1)), (gp1, gx1) = np_tree(loss_fn(single)(PARAMS, xp, mask, g))
    w, b = np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"])
    y_ref, s_ref = ref_batchnorm(xp, w, b, NP_STATS, train=True, mask=mask)
    diffs: dict[str, float] = {}
    if not np.all(np.isfinite(y)):
        raise Mismatch("non-finite outputs")
    compare(diffs, "y (valid positions) vs float64 ref", y[mask], y_ref[mask], ATOL_REF)
    for k in ("running_mean", "running_var"):
        compare(diffs, f"{k} vs float64 ref", s[k], s_ref[k], ATOL_REF)
        compare(diffs, f"{k} vs 1 device", s[k], s1[k], ATOL_DEVICE)
    compare(diffs, "y (valid positions) vs 1 device", y[mask], y1[mask], ATOL_DEVICE)
    compare(diffs, "dx vs 1 device", gx, gx1, ATOL_DEVICE)
    for k in ("weight", "bias"):
        compare(diffs, f"d{k} vs 1 device", gp[k], gp1[k], ATOL_DEVICE)
    return diffs


# --- 3. sub-group sync == per-group full-batch statistics --------------------------------


def per_group_reference(groups: list[list[int]]):
    """Per group of devices: the float64 reference on the rows those devices hold."""
    per = B // NDEV
    w, b = np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"])
    out = {}
    for grp in groups:
        rows = np.concatenate([np.arange(d * per, (d + 1) * per) for d in grp])
        out[tuple(grp)] = (rows, *ref_batchnorm(X[rows], w, b, NP_STATS, train=True))
    return out


def compare_groups(diffs, groups, y, stats_of_device) -> None:
    for grp, (rows, y_ref, s_ref) in per_group_reference(groups).items():
        compare(diffs, f"y of group {list(grp)}", y[rows], y_ref, ATOL_REF)
        for d in grp:
            for k in ("running_mean", "running_var"):
                compare(diffs, f"{k} of device {d}", stats_of_device(d)[k], s_ref[k], ATOL_REF)
    diffs.update(
        {
            "max y": max(v for k, v in diffs.items() if k.startswith("y")),
            "max stats": max(v for k, v in diffs.items() if "device" in k),
        }
    )
    for k in [k for k in diffs if k.startswith(("y of", "running"))]:
        del diffs[k]


@check
def shard_map_2d_mesh_sync_inner_axis() -> dict[str, float]:
    """Mesh (2, 4) = ('host', 'dev'), batch over both, stats synced over 'dev' only."""
    mesh = jax.make_mesh((2, 4), ("host", "dev"))
    x = put(mesh, P(("host", "dev")), X)

    def local(x):
        y, s = bnjax.apply(PARAMS, STATS, x, True, axis_name="dev")
        return y, jax.tree.map(lambda v: v[None], s)  # one row of stats per host

    y, s = np_tree(
        jax.jit(
            jax.shard_map(
                local,
                mesh=mesh,
                in_specs=P(("host", "dev")),
                out_specs=(P(("host", "dev")), P("host")),
            )
        )(x)
    )
    # Device (h, d) holds rows block h * 4 + d: group h is devices 4h .. 4h + 3.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    diffs: dict[str, float] = {}
    compare_groups(diffs, groups, y, lambda d: {k: v[d // 4] for k, v in s.items()})
    return diffs


@check
def pmap_axis_index_groups() -> dict[str, float]:
    """pmap with axis_index_groups (contiguous and interleaved) == per-group stats."""
    diffs: dict[str, float] = {}
    for groups in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]):
        f = jax.pmap(
            lambda x, groups=groups: bnjax.apply(
                PARAMS, STATS, x, True, axis_name="i", axis_index_groups=groups
            ),
            axis_name="i",
        )
        y, s = np_tree(f(X.reshape(NDEV, -1, 3, C)))
        sub: dict[str, float] = {}
        compare_groups(
            sub, groups, y.reshape(X.shape), lambda d, s=s: {k: v[d] for k, v in s.items()}
        )
        diffs.update({f"{k} {groups}": v for k, v in sub.items()})
    return diffs


@check
def shard_map_axis_index_groups_error() -> dict[str, float]:
    """shard_map has no axis_index_groups: the error must say to use a mesh axis."""
    mesh = data_mesh()
    x = put(mesh, P("data"), X)

    def local(x):
        y, _ = bnjax.apply(
            PARAMS, {}, x, True, axis_name="data", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]
        )
        return y

    try:
        jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)
    except NotImplementedError as e:
        if "mesh" not in str(e):
            raise Mismatch(f"unhelpful error for axis_index_groups under shard_map: {e!r}") from e
        print(f"  error as expected: {str(e)[:160]}")
        return {}
    raise Mismatch("axis_index_groups under shard_map silently ran")


# --- 4. jit + NamedSharding, plain apply (no axis_name) == one device ---------------------


@check
def jit_named_sharding() -> dict[str, float]:
    """Batch sharded over a Mesh (Explicit and Auto axes); bnjax.apply without axis_name."""
    diffs: dict[str, float] = {}
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = data_mesh(axis_type)
        x, g = put(mesh, P("data"), X, G)
        params, stats = put(mesh, P(), PARAMS), put(mesh, P(), STATS)

        @jax.jit
        def step(params, x, g, stats=stats):
            def loss(params, x):
                y, new_stats = bnjax.apply(params, stats, x, True)
                return jnp.sum(y * g), (y, new_stats)

            (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
            return y, s, gp, gx

        y, s, gp, gx = step(params, x, g)
        if not y.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), y.ndim):
            raise Mismatch(f"{axis_type}: y is not batch-sharded: {y.sharding}")
        sub: dict[str, float] = {}
        compare_full(sub, *np_tree((y, s, gp, gx)))
        diffs.update({f"{k} ({axis_type.name})": v for k, v in sub.items() if "1 device" in k})
        gathered = all_gathers(step, params, x, g)
        if gathered:
            raise Mismatch(f"{axis_type}: the compiled step all-gathers {gathered}")
    return diffs


def all_gathers(fn, *args) -> list[str]:
    """Shapes of the all-gathers in `fn`'s compiled HLO (a sharded batch must stay put)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"= (\S+) all-gather\(", hlo)


@check
def jit_named_sharding_masked() -> dict[str, float]:
    """The jit + NamedSharding path with a mask and an all-padding shard.

    On both kinds of mesh axes, and with the batch's first position counted or not
    (the shift is then found by a reduction): never an all-gather of the batch.
    """

    def fn(x, mask):
        return bnjax.apply(PARAMS, STATS, x, True, mask=mask)

    per = B // NDEV
    w, b = np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"])
    diffs: dict[str, float] = {}
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = data_mesh(axis_type)
        for first_counted in (True, False):
            mask = np.ones((B, 3), bool)
            mask[2 * per : 3 * per] = False
            mask[7, 2] = False
            mask[0, 0] = first_counted
            xp = np.where(mask[..., None], X, 1e6).astype(np.float32)
            x, m = put(mesh, P("data"), xp, mask)
            y, s = np_tree(jax.jit(fn)(x, m))
            y_ref, s_ref = ref_batchnorm(xp, w, b, NP_STATS, train=True, mask=mask)
            tag = f"({axis_type.name}, first position {'counted' if first_counted else 'padding'})"
            compare(diffs, f"y (valid) vs float64 ref {tag}", y[mask], y_ref[mask], ATOL_REF)
            for k in ("running_mean", "running_var"):
                compare(diffs, f"{k} vs float64 ref {tag}", s[k], s_ref[k], ATOL_REF)
            gathered = all_gathers(fn, x, m)
            if gathered:
                raise Mismatch(f"{tag}: the compiled apply all-gathers {gathered}")
    return diffs


# --- 5. shard_map without axis_name: local (per-shard) statistics -------------------------


@check
def shard_map_local_bn_without_axis_name() -> dict[str, float]:
    """No axis_name: each device normalizes with its own shard's stats (local BN)."""
    mesh = data_mesh()
    x = put(mesh, P("data"), X)

    def local(x):
        y, s = bnjax.apply(PARAMS, STATS, x, True)
        return y, jax.tree.map(lambda v: v[None], s)

    y, s = np_tree(
        jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)
    )
    per = B // NDEV
    w, b = np.asarray(PARAMS["weight"]), np.asarray(PARAMS["bias"])
    diffs: dict[str, float] = {"y": 0.0, "stats": 0.0}
    for d in range(NDEV):
        rows = slice(d * per, (d + 1) * per)
        y_ref, s_ref = ref_batchnorm(X[rows], w, b, NP_STATS, train=True)
        diffs["y"] = max(diffs["y"], maxdiff(y[rows], y_ref))
        for k in ("running_mean", "running_var"):
            diffs["stats"] = max(diffs["stats"], maxdiff(s[k][d], s_ref[k]))
    if max(diffs.values()) > ATOL_REF:
        raise Mismatch(f"local BN differs from per-shard reference: {diffs}")
    # ...and it is not the global answer (the shards' statistics really differ).
    y_glob, _ = ref_batchnorm(X, w, b, NP_STATS, train=True)
    diffs["y vs global (must be large)"] = maxdiff(y, y_glob)
    if diffs["y vs global (must be large)"] < 1e-2:
        raise Mismatch("local BN gave the global statistics: the test data is too uniform")
    return diffs


def summary(results: dict) -> str:
    """The largest difference from one device and from the float64 reference, all checks."""
    diffs = [(k, v) for r in results.values() for k, v in r["max_abs_diff"].items()]
    device = max((v for k, v in diffs if "vs 1 device" in k), default=0.0)
    ref = max((v for k, v in diffs if "float64 ref" in k), default=0.0)
    return f"largest difference: from one device {device:.1e}, from the float64 reference {ref:.1e}"


def main(argv: list[str]) -> int:
    json_path = argv[argv.index("--json") + 1] if "--json" in argv else None
    print(f"jax {jax.__version__}, {jax.device_count()} devices: {jax.devices()[0].platform}")
    if jax.device_count() != NDEV:
        print(f"FAIL: need {NDEV} devices; set XLA_FLAGS=--xla_force_host_platform_device_count=8")
        return 2
    results = {}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            diffs = fn()
            ok, msg = True, ""
        except Exception as e:  # report every check, then fail
            diffs, ok = {}, False
            msg = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        dt = time.perf_counter() - t0
        results[name] = {"ok": ok, "max_abs_diff": diffs, "message": msg, "seconds": dt}
        same = [v for k, v in diffs.items() if "must be large" not in k]
        worst = f"max|diff| {max(same, default=0.0):.2e}" if ok else "see below"
        print(f"{'ok  ' if ok else 'FAIL'} {name:42s} {worst}  ({dt:.1f}s)")
        for k, v in diffs.items():
            print(f"       {k:44s} {v:.2e}")
        if not ok:
            print("       " + msg.replace("\n", "\n       "))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    failed = [n for n, r in results.items() if not r["ok"]]
    print(summary(results))  # docs/scaling.md quotes this line
    print(
        f"{len(results) - len(failed)}/{len(results)} checks passed"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
