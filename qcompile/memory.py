"""Process memory, as the layer-by-layer runner (:mod:`qcompile.blockwise`) measures and manages it:
the peak resident set size, a new peak per step, and returning freed memory to the OS between
steps. Linux/glibc facilities; each function is a no-op (or falls back) elsewhere.

Imports nothing from qcompile.
"""
from __future__ import annotations

import gc
import resource


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB: Linux ``VmHWM`` (this program's own;
    ``getrusage``'s ``ru_maxrss`` also carries the parent's peak across fork and exec), else
    ``getrusage``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak: Linux resets ``VmHWM`` to the current RSS (``/proc/self/clear_refs``,
    value 5), so :func:`peak_rss_mb` then measures the peak of what follows; a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_freed_memory() -> None:
    """Free what a finished step left: its graph module, exported program and the tensors they
    hold sit in reference cycles (nodes and their module), which only the cycle collector frees;
    then hand the freed heap back to the OS (glibc ``malloc_trim``; a no-op elsewhere), or the
    RSS of later steps starts higher."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_large_frees_to_os(threshold: int = 1 << 20) -> None:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own mapping,
    returned to the OS when freed (``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere). By default
    glibc raises that threshold each time a large block is freed, so later tensors of a few MB
    come from the heap, which fragments: measured on 3 blocks of hidden 1024, the block step's peak
    grew 934 → 982 → 1,038 MiB without it and stayed at 987 / 992 / 846 MiB with it. Process-wide,
    like the environment variable ``MALLOC_MMAP_THRESHOLD_`` it sets the same way."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)   # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
