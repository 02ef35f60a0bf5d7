"""Process-level CPU tuning that the `longcat` command applies at start-up; importing the library
changes nothing (call `tune_cpu_allocator()` yourself to get the same in your own process).

glibc's malloc serves every allocation above a moving threshold (128 KiB at first, at most 32 MiB)
with fresh pages from mmap and unmaps them on free, so the large temporaries of a training step or a
decode step (gathered expert rows, activations, gradients) page-fault again on every first touch
(what that costs: docs/benchmarks.md, "Allocator"). Fixing the threshold at its 32 MiB maximum and keeping freed heap
memory in the process (trim threshold 1 GiB) lets those buffers be reused. PyTorch's CPU performance
guide recommends jemalloc or tcmalloc for the same reason; this needs neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for this parameter on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30


def tune_cpu_allocator() -> bool:
    """Apply the malloc settings above; True when they took effect. Skipped with
    LONGCAT_MALLOC_TUNING=0, off Linux, or under a C library without glibc's mallopt."""
    if os.environ.get("LONGCAT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # musl and others export a mallopt that accepts nothing and returns 0
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
