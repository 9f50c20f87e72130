"""Keep freed CPU tensor memory in the heap instead of handing it back to the kernel.

glibc serves large allocations (above a threshold that adapts up to 32 MiB) with fresh mmap'd
pages and returns them on free, so every new activation tensor of a training step pays page
faults on first touch: measured here, a 39 MB tensor costs ~9 ms to allocate and fill versus
~0.6 ms to fill an existing one, more than the kernel that writes it. Raising the mmap threshold
and disabling trimming makes the heap reuse those pages, as jemalloc/tcmalloc would.

This changes process-wide allocator behaviour (resident memory stays at its peak), so the
library never does it on import: the CLI calls it for its own processes, and the benchmarks for
theirs. ``FLOWFM_MALLOC_TUNE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds; returns whether it took effect (glibc only)."""
    global _done
    if _done:
        return True
    if os.environ.get("FLOWFM_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _done
