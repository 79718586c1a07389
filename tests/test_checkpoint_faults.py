"""A restore never depends on an earlier, failed one; nothing a save or restore opens
outlives it.

`tests/test_checkpoint.py`'s corruption scenario (truncate the data, restore and
fail; flip one byte, restore and fail; write the original bytes back, restore and
succeed; then manifest-level faults) runs 20 times in one process. Every repaired
restore must succeed, and no failed one may leave work behind: no unraisable
exception (TensorStore reads calling back into Orbax's closed event loop, "Event
loop is closed") and no asyncio error log ("Task exception was never retrieved").
"""

from __future__ import annotations

import gc
import logging
import sys

import pytest

pytest.importorskip("orbax.checkpoint", reason="sharded checkpoints are written with Orbax")
pytest.importorskip("flax", reason="the scenario's model state comes from test_checkpoint")

from test_checkpoint import (  # noqa: E402
    test_sharded_unfinished_truncated_and_corrupted_checkpoints_raise as corruption_scenario,
)

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

REPEATS = 20


def test_restore_after_failed_restores_20_times_in_one_process(tmp_path, caplog, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    caplog.set_level(logging.ERROR, logger="asyncio")
    for i in range(REPEATS):
        corruption_scenario(tmp_path / f"run{i}")
    gc.collect()  # whatever was left pending would report now
    assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable[:3]]
    leaked = [r.getMessage()[:200] for r in caplog.records if r.name == "asyncio"]
    assert not leaked, leaked[:3]
