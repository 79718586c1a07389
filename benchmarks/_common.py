"""What the benchmark scripts share: the allocator pinning and the paired ratio.

Import it before JAX: `pin_malloc()` must run before XLA allocates anything.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import statistics
import sys
from collections.abc import Sequence

# Benchmark the checkout the script lives in, not whichever bnjax is installed: a
# script's own folder (benchmarks/) is first on sys.path, the repository root is not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


def pin_malloc() -> bool:
    """Keeps glibc from handing freed buffers back to the OS (the page-fault trap).

    A fresh multi-MiB buffer that glibc takes from the OS and returns on free costs
    thousands of minor page faults per call, which makes timings bimodal.

    Returns:
      Whether every setting took (False where there is no glibc).

    Example:
      >>> isinstance(pin_malloc(), bool)
      True
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's 64-bit maximum
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    # XLA's temp buffers can exceed the 32 MiB mmap threshold: no mmap at all, and
    # one arena (thread arenas are mmap'd heaps that glibc shrinks on free).
    ok &= libc.mallopt(_M_MMAP_MAX, 0)
    ok &= libc.mallopt(_M_ARENA_MAX, 1)
    return bool(ok)


def paired_median(times: Sequence[float], ref_times: Sequence[float]) -> float:
    """Median over rounds of `times[i] / ref_times[i]` (both timed in round i).

    The two ran back to back in every round, so a slow spell of the machine mostly
    scales both; the per-round ratio cancels it, where a ratio of two medians taken
    at different moments would not.

    Args:
      times: per-round times of one implementation.
      ref_times: the reference's per-round times, same rounds, same order.

    Returns:
      The median per-round ratio (NaN when there are no rounds).

    Example:
      >>> paired_median([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])
      2.0
    """
    if not ref_times:
        return float("nan")
    return statistics.median(t / r for t, r in zip(times, ref_times, strict=True))


def load_line() -> str:
    """The UTC time and the machine's load average (1, 5, 15 minutes), for a results file.

    Example:
      >>> "load average" in load_line()
      True
    """
    now = datetime.datetime.now(datetime.UTC)
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return f"{now:%Y-%m-%d %H:%M} UTC, load average unavailable"
    return f"{now:%Y-%m-%d %H:%M} UTC, load average {one:.2f}, {five:.2f}, {fifteen:.2f}"
