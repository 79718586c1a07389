"""Real multi-process JAX: 2 processes x 4 CPU devices vs one process on the full batch.

`tests/_multiprocess_worker.py` runs in 2 processes that form one JAX runtime
(`jax.distributed.initialize`, gloo collectives), one launch for all checks (startup
is the cost); this module compares what they computed with one process on the full
batch and with the float64 reference, and checks that a process that dies or never
joins fails the launch within a bounded time, names the process, and leaves no
process behind.

    python tests/test_multiprocess.py      # prints every max difference
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # as a script too: this checkout's bnjax

import _multiprocess_worker as W  # noqa: E402
import doc_figures  # noqa: E402
from reference import ref_batchnorm, ref_grads  # noqa: E402

import bnjax  # noqa: E402
from bnjax.deploy import restore_sharded_checkpoint, save_sharded_checkpoint  # noqa: E402

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
NPROC, LOCAL_DEVICES = 2, 4
# float32 tolerances: the same maths in another summation order (per-device partial
# sums, then a cross-process all-reduce) differs by a few ulps of the values involved
# (|x| ~ 10, outputs ~ 3, gradients ~ 10): 1e-4 leaves ~100 ulps of headroom. Against
# the float64 reference the float32 rounding itself counts too.
ATOL_PROCESS, ATOL_REF = 1e-4, 2e-4


class LaunchError(AssertionError):
    """A multi-process launch failed: a process died, never joined, or timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *, scenario: str = "checks", nproc: int = NPROC, timeout: float = 240,
           grace: float = 3.0, init_timeout: int = 60, join_timeout: float = 120) -> float:
    """Runs `nproc` workers to completion; returns the seconds it took.

    Every worker runs in its own session (process group). When one exits with an
    error, the others get `grace` seconds to exit by themselves, then their groups are
    killed; after `timeout` seconds every group is killed. Every worker is reaped
    before this returns or raises.

    Raises:
      LaunchError: a worker failed, never joined, or the launch timed out. The message
        names the process that failed first, the ones that never joined the runtime,
        and the tail of each one's log.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The workers import the bnjax this process imported, not another installed one.
    root = str(Path(bnjax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}".strip()
    port = free_port()
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    first_failure: tuple[int, int, float] | None = None
    timed_out = late = False
    try:
        for i in range(nproc):
            with open(out / f"log.{i}", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", str(nproc), "--process-id", str(i), "--out", str(out),
                     "--scenario", scenario, "--init-timeout", str(init_timeout)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            for i, code in enumerate(codes):
                if code not in (None, 0) and first_failure is None:
                    first_failure = (i, code, now)
            if all(code is not None for code in codes):
                break
            if first_failure is not None and now > first_failure[2] + grace:
                break
            if now > start + timeout:
                timed_out = True
                break
            if now > start + join_timeout and not all(
                (out / f"joined.{i}").exists() for i in range(nproc)
            ):
                late = True
                break
            time.sleep(0.05)
    finally:
        codes = [p.poll() for p in procs]
        for p in procs:  # the whole group: the worker and anything it started
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
    elapsed = time.monotonic() - start
    if first_failure is None and not (timed_out or late) and all(c == 0 for c in codes):
        return elapsed

    lines = [f"{nproc} processes of {WORKER.name} (scenario {scenario!r}) failed "
             f"after {elapsed:.1f} s:"]
    if first_failure is not None:
        i, code, _ = first_failure
        lines.append(f"process {i} exited first, with {_status(code)}")
    if timed_out:
        lines.append(f"the launch timed out after {timeout:g} s")
    if late:
        lines.append(f"not every process joined the runtime within {join_timeout:g} s")
    for i, code in enumerate(codes):
        joined = (out / f"joined.{i}").exists()
        state = "killed (still running)" if code is None else _status(code)
        lines.append(f"process {i}: {state}" + ("" if joined else "; it never joined the runtime"))
    for i in range(len(procs)):
        tail = (out / f"log.{i}").read_text(errors="replace").splitlines()
        tail = [t for t in tail if not t.startswith(("W0000", "I0000", "[Gloo]"))][-15:]
        lines.append(f"--- log of process {i} (last lines) ---\n" + "\n".join(tail))
    raise LaunchError("\n".join(lines))


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


def assert_all_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # no process left in the worker's group


# --- the one-process truth ----------------------------------------------------------------


@jax.jit
def _one_process(params, batch_stats, x, g, mask=None):
    return W.bn_loss_and_grads(params, batch_stats, x, g, mask)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def compare_all(res: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """`{check: (max abs difference, tolerance)}` for every multi-process result."""
    diffs: dict[str, tuple[float, float]] = {}

    def close(name, got, want, atol):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        diffs[name] = (float(np.max(np.abs(got - want))) if got.size else 0.0, atol)

    def exact(name, got, want):
        ok = np.array_equal(np.asarray(got), np.asarray(want))
        diffs[name] = (0.0 if ok else float("inf"), 0.0)

    w, b = PARAMS_NP["weight"], PARAMS_NP["bias"]
    exact("make_array_from_process_local_data == X", res["assembled_x"], W.X)

    # Full batch: paths A and B vs one process and the float64 reference.
    y1, s1, gp1, gx1 = _np(_one_process(W.PARAMS, W.STATS, W.X, W.G))
    y_ref, s_ref = ref_batchnorm(W.X, w, b, W.STATS, train=True)
    dx_ref, dw_ref, db_ref = ref_grads(W.X, w, W.G)
    for tag in ("A", "B"):
        close(f"{tag}: y vs 1 process", res[f"{tag}/y"], y1, ATOL_PROCESS)
        close(f"{tag}: dx vs 1 process", res[f"{tag}/gx"], gx1, ATOL_PROCESS)
        close(f"{tag}: y vs float64", res[f"{tag}/y"], y_ref, ATOL_REF)
        close(f"{tag}: dx vs float64", res[f"{tag}/gx"], dx_ref, ATOL_REF)
        for k, ref in (("weight", dw_ref), ("bias", db_ref)):
            close(f"{tag}: d{k} vs 1 process", res[f"{tag}/gp['{k}']"], gp1[k], ATOL_PROCESS)
            close(f"{tag}: d{k} vs float64", res[f"{tag}/gp['{k}']"], ref, ATOL_REF * 10)
        for k in ("running_mean", "running_var"):
            close(f"{tag}: {k} vs 1 process", res[f"{tag}/stats['{k}']"], s1[k], ATOL_PROCESS)
            close(f"{tag}: {k} vs float64", res[f"{tag}/stats['{k}']"], s_ref[k], ATOL_REF)
        exact(f"{tag}: num_batches_tracked", res[f"{tag}/stats['num_batches_tracked']"], 4)

    # Within each host: host h's statistics are those of its own 16 rows.
    half = W.B // NPROC
    for h in range(NPROC):
        rows = slice(h * half, (h + 1) * half)
        yh_ref, sh_ref = ref_batchnorm(W.X[rows], w, b, W.STATS, train=True)
        close(f"host-local: y of host {h} vs float64", res["host_local/y"][rows], yh_ref, ATOL_REF)
        for k in ("running_mean", "running_var"):
            close(f"host-local: {k} of host {h} vs float64",
                  res[f"host_local/stats['{k}']"][h], sh_ref[k], ATOL_REF)
        close(f"all hosts: y of host {h} vs 1 process", res["all_hosts/y"][rows], y1[rows],
              ATOL_PROCESS)
        for k in ("running_mean", "running_var"):
            close(f"all hosts: {k} of host {h} vs 1 process",
                  res[f"all_hosts/stats['{k}']"][h], s1[k], ATOL_PROCESS)

    # Unequal hosts (13 and 5 valid rows) via mask.
    ym1, sm1, gpm1, gxm1 = _np(_one_process(W.PARAMS, W.STATS, W.X_PADDED, W.G, W.MASK))
    ym_ref, sm_ref = ref_batchnorm(W.X, w, b, W.STATS, train=True, mask=W.MASK)
    valid = W.MASK
    for tag in ("mask_A", "mask_B"):
        close(f"{tag}: y (valid) vs 1 process", res[f"{tag}/y"][valid], ym1[valid], ATOL_PROCESS)
        close(f"{tag}: y (valid) vs float64", res[f"{tag}/y"][valid], ym_ref[valid], ATOL_REF)
        close(f"{tag}: dx (valid) vs 1 process", res[f"{tag}/gx"][valid], gxm1[valid],
              ATOL_PROCESS)
        for k in ("weight", "bias"):
            close(f"{tag}: d{k} vs 1 process", res[f"{tag}/gp['{k}']"], gpm1[k], ATOL_PROCESS)
        for k in ("running_mean", "running_var"):
            close(f"{tag}: {k} vs float64", res[f"{tag}/stats['{k}']"], sm_ref[k], ATOL_REF)
            close(f"{tag}: {k} vs 1 process", res[f"{tag}/stats['{k}']"], sm1[k], ATOL_PROCESS)
    exact("mask_B: count == 53 valid positions", res["mask_B/count"], W.MASK_COUNT)

    # make_train_step, 4 steps of 2 micro-batches: paths A and B vs one process.
    truth, losses = _train_truth()
    for tag in ("train_A", "train_B"):
        flat = jax.tree_util.tree_flatten_with_path(truth)[0]
        for path, leaf in flat:
            name = f"{tag}/state{jax.tree_util.keystr(path)}"
            if np.issubdtype(np.asarray(leaf).dtype, np.integer):
                exact(f"{tag}: {jax.tree_util.keystr(path)}", res[name], leaf)
            else:
                close(f"{tag}: {jax.tree_util.keystr(path)} vs 1 process", res[name], leaf,
                      ATOL_PROCESS)
        close(f"{tag}: losses vs 1 process", res[f"{tag}/loss"], losses, ATOL_PROCESS)

    # Checkpoints: every restore is bit-identical to what was saved, whatever the
    # process count and mesh; resuming on the same layout is bit-identical too.
    for saved_tag, restored_tags in (("ckpt_2p_saved", ("ckpt_2p_on_1p", "ckpt_2p_on_host_mesh")),
                                     ("ckpt_1p_saved", ("ckpt_1p_restored",))):
        keys = sorted(k for k in res if k.startswith(saved_tag + "/"))
        assert len(keys) >= 10, keys
        for restored_tag in restored_tags:
            for key in keys:
                got = res[key.replace(saved_tag, restored_tag, 1)]
                ok = np.array_equal(got, res[key]) and got.dtype == res[key].dtype
                diffs[f"{restored_tag} == saved: {key.split('/', 1)[1]}"] = (
                    0.0 if ok else float("inf"), 0.0)
    exact("resume on 2 processes from ckpt_2p == uninterrupted, bit for bit",
          res["resume_2p_bit_identical"], True)
    for tag in ("resume_1to2", "resume_2to1"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(truth)[0]:
            name = f"{tag}/state{jax.tree_util.keystr(path)}"
            close(f"{tag}: {jax.tree_util.keystr(path)} vs 1 process", res[name], leaf,
                  ATOL_PROCESS)
    return diffs


def summary(diffs: dict[str, tuple[float, float]]) -> str:
    """The largest difference per group of checks, with the group's tolerance."""
    groups = {
        "vs 1 process": lambda k: "float64" not in k and not k.startswith(("train_", "resume_")),
        "vs the float64 reference": lambda k: "float64" in k,
        "make_train_step and resumes, vs 1 process": lambda k: k.startswith(("train_", "resume_")),
    }
    lines = []
    for label, member in groups.items():
        d, tol = max((v for k, v in diffs.items() if member(k) and v[1] > 0), default=(0.0, 0.0))
        lines.append(f"largest {label}: {d:.1e} (tolerance {tol:.0e})")
    exact = [k for k, (d, tol) in diffs.items() if tol == 0]
    lines.append(f"{len(exact)} checks bit for bit")
    return "\n".join(lines)


def collective_costs(res: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """`{"A1": (all-reduce ops, bytes), ...}` of the compiled steps with 1 and 2 BatchNorms."""
    costs = {}
    for tag in ("A1", "A2", "B1", "B2"):
        ops = list(res[f"hlo/{tag}/ops"])
        assert set(ops) <= {"all-reduce"}, f"{tag}: collectives other than all-reduce: {ops}"
        costs[tag] = (len(ops), int(res[f"hlo/{tag}/bytes"].sum()))
    return costs


def expected_costs(layers: int, path: str) -> tuple[int, int]:
    """The all-reduces of one forward + backward pass with `layers` x (dense -> BN(C)).

    Per BatchNorm layer, 3 all-reduces. Path A (`jit`, the fused path and its
    closed-form derivative): 5C float32 values (forward: the shift, then the shifted
    sums S1, S2; backward: sum(dy) and sum(dy * x_hat), which are also the layer's
    weight and bias gradients). Path B (`shard_map` + `axis_name`, the general path
    differentiated by JAX): 6C values. Once per step: the dense layers' gradients and
    the loss; path B adds the (static) element count, 1 int32.
    """
    c, dense = W.H, W.F * W.H + (layers - 1) * W.H * W.H
    ops = 3 * layers + 1 + (path == "B")
    per_layer = 5 * c if path == "A" else 6 * c
    return ops, 4 * (per_layer * layers + dense + 1) + 4 * (path == "B")


PARAMS_NP = {k: np.asarray(v) for k, v in W.PARAMS.items()}


@functools.cache
def _train_truth():
    step = jax.jit(W.make_train_step(W.make_loss_fn(), W.OPTIMIZER, accum_steps=W.ACCUM))
    p, s = W.init_model()
    o = W.OPTIMIZER.init(p)
    losses = []
    for i in range(W.STEPS):
        p, s, o, metrics = step(p, s, o, (W.TRAIN_X[i], W.TRAIN_Y[i]))
        losses.append(np.asarray(metrics.loss))
    return _np({"params": p, "batch_stats": s, "opt_state": o}), np.stack(losses)



# --- the tests ----------------------------------------------------------------------------


def run_two_processes(tmp_path: Path) -> dict[str, np.ndarray]:
    """One process writes a checkpoint, 2 processes run every check, 1 restores theirs."""
    saved_1p = W.train_one_process(W.CKPT_STEP)
    save_sharded_checkpoint(tmp_path / "ckpt_1p", saved_1p)
    launch(tmp_path)
    with np.load(tmp_path / "results.npz") as f:
        res = dict(f)
    for path, leaf in jax.tree_util.tree_flatten_with_path(_np(saved_1p))[0]:
        res[f"ckpt_1p_saved/state{jax.tree_util.keystr(path)}"] = leaf
    # 2 processes wrote ckpt_2p; restore it here, on 1 process and 1 device.
    params, stats = W.init_model()
    target = {"params": params, "batch_stats": stats, "opt_state": W.OPTIMIZER.init(params),
              "step": 0}
    restored = restore_sharded_checkpoint(tmp_path / "ckpt_2p", target)
    assert isinstance(restored["step"], int), type(restored["step"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(_np(restored))[0]:
        res[f"ckpt_2p_on_1p/state{jax.tree_util.keystr(path)}"] = leaf
    resumed = W.train_one_process(W.STEPS - restored["step"], restored, first=restored["step"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(_np(resumed))[0]:
        res[f"resume_2to1/state{jax.tree_util.keystr(path)}"] = leaf
    return res


@pytest.mark.slow  # over 20 s on 2 cores
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    res = run_two_processes(tmp_path)
    diffs = compare_all(res)
    bad = {k: v for k, v in diffs.items() if not v[0] <= v[1]}
    report = "\n".join(f"  {k}: {d:.3g} > {t:g}" for k, (d, t) in bad.items())
    assert not bad, f"{len(bad)}/{len(diffs)} multi-process checks failed:\n{report}"
    # docs/scaling.md (section 7) quotes what `python tests/test_multiprocess.py` prints
    doc_figures.check("python tests/test_multiprocess.py", summary(diffs))
    costs = collective_costs(res)
    want = {f"{path}{n}": expected_costs(n, path) for path in "AB" for n in (1, 2)}
    assert costs == want, (
        f"the compiled steps' all-reduces (ops, bytes) changed: {costs}, expected {want}; "
        "update the cost section of docs/scaling.md with the new numbers"
    )


def test_a_process_that_dies_fails_fast_and_is_named(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(LaunchError, match="process 1 exited first, with status 3") as err:
        launch(tmp_path, scenario="die", timeout=60, init_timeout=20)
    assert time.monotonic() - start < 60
    assert "dying on purpose" in str(err.value)
    assert_all_gone([int((tmp_path / f"joined.{i}").read_text()) for i in range(NPROC)])


def test_a_process_that_never_joins_fails_in_bounded_time(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(LaunchError, match="process 1: .*it never joined the runtime") as err:
        launch(tmp_path, scenario="never_join", timeout=60, init_timeout=30, join_timeout=8)
    assert time.monotonic() - start < 30
    assert "not every process joined the runtime within 8 s" in str(err.value), str(err.value)
    assert not (tmp_path / "joined.1").exists()
    # The worker that never joined was killed with its process group.
    with pytest.raises(ProcessLookupError):
        os.killpg(int(re.search(r"pid (\d+)", (tmp_path / "log.1").read_text()).group(1)), 0)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = run_two_processes(Path(d))
    for name, (d, tol) in compare_all(res).items():
        print(f"{'ok  ' if d <= tol else 'FAIL'} {d:9.2e} (tol {tol:g})  {name}")
    print(summary(compare_all(res)))
    for tag, (ops, nbytes) in collective_costs(res).items():
        print(f"path {tag[0]}, {tag[1]} BatchNorm layer(s): {ops} all-reduces, {nbytes} bytes")
