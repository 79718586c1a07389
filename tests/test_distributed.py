"""Synchronized BatchNorm on 8 simulated CPU devices (shard_map, pmap, vmap, jit + sharding).

jax fixes its device count when it starts, and this pytest process may already have
started it, so every check runs in ONE subprocess (`tests/_distributed_checks.py`)
with `XLA_FLAGS=--xla_force_host_platform_device_count=8`; the test below reports
the outcome of every check. Run the script directly to see every max difference:

    python tests/_distributed_checks.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import doc_figures
import pytest

SCRIPT = Path(__file__).with_name("_distributed_checks.py")
# docs/scaling.md (section 7) quotes what this prints
COMMAND = "XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_distributed_checks.py"

CHECKS = [
    # 1. axis_name under shard_map, pmap and vmap == one device, full batch
    "shard_map_axis_name",
    "shard_map_grad_inside",
    "pmap_axis_name",
    "vmap_axis_name_per_example",
    "vmap_inside_devices_nested_axes",
    # 2. unequal shards via mask == global statistics of the valid elements
    "shard_map_unequal_masked_shards",
    "shard_map_masked_padding_shard",
    # 3. sub-group sync == per-group statistics
    "shard_map_2d_mesh_sync_inner_axis",
    "pmap_axis_index_groups",
    "shard_map_axis_index_groups_error",
    # 4. jit + NamedSharding, no axis_name == one device
    "jit_named_sharding",
    "jit_named_sharding_masked",
    # 5. shard_map without axis_name: local (per-shard) statistics
    "shard_map_local_bn_without_axis_name",
]


@pytest.mark.slow  # over 20 s on 2 cores
def test_distributed_checks(tmp_path: Path) -> None:
    """All checks, one subprocess (a single test so that pytest-xdist cannot split it)."""
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not out.exists():
        pytest.fail(
            f"{SCRIPT.name} exited {proc.returncode} without results:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(CHECKS), (
        f"the checks in {SCRIPT.name} and in this list differ: {sorted(results)}"
    )
    failed = {name: r for name, r in results.items() if not r["ok"]}
    report = "\n\n".join(
        f"{name} FAILED:\n{r['message']}"
        + "".join(f"\n  {k}: {v:.3g}" for k, v in r["max_abs_diff"].items())
        for name, r in failed.items()
    )
    assert not failed, f"{len(failed)}/{len(CHECKS)} distributed checks failed:\n\n{report}"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc_figures.check(COMMAND, proc.stdout)


@pytest.mark.slow  # over 20 s on 2 cores
def test_data_parallel_example_matches_single_device() -> None:
    """`python examples/data_parallel.py` exits 0 (its synchronized runs match the 1-device
    run) and prints the figures docs/scaling.md quotes (section 7)."""
    root = Path(__file__).parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    proc = subprocess.run(
        [sys.executable, "examples/data_parallel.py"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "jit + NamedSharding" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout
    doc_figures.check("python examples/data_parallel.py", proc.stdout)
