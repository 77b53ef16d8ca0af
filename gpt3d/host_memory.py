"""Resident memory of this process (Linux /proc), and glibc's habit of keeping freed memory.

On a CPU the memory that can run out is the resident set (RSS): tensors plus torch itself
plus freed blocks the C allocator keeps for reuse. glibc serves blocks up to its mmap
threshold from its heap and keeps them after free; the threshold grows with the largest
block freed (up to 32 MiB), so after start-up and the first steps a rank keeps whatever
transient buffers it once used (FSDP all-gather copies, full-size temporaries).
`limit_retention()` pins the threshold (MALLOC_MMAP_THRESHOLD_ does the same from the
environment) so large transient blocks go back to the OS when freed, and `release()`
returns free heap memory now (malloc_trim). Measured effects: docs/memory.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

GiB = 2**30
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers (malloc.h)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_gib() -> float:
    """Resident set size now (NaN where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib / 2**20 if kib is not None else float("nan")


def peak_rss_gib() -> float:
    """Peak resident set size since start (or since reset_peak_rss)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: getrusage has the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return kib / 2**20


def reset_peak_rss() -> bool:
    """Restart peak_rss_gib from the current RSS (Linux: /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_retention(mmap_threshold: int = 1 << 20) -> bool:
    """Serve blocks larger than mmap_threshold bytes with mmap, so freeing them returns the
    memory to the OS (glibc only; False elsewhere)."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def release() -> bool:
    """Give free heap memory back to the OS now (glibc's malloc_trim)."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))
