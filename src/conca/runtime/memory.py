"""Giving freed memory back to the operating system during long streaming passes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another OS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc; a no-op elsewhere).

    A pass that reads shard after shard allocates and frees buffers of many sizes; glibc keeps
    freed heap memory for reuse, and its fragments add up, so without this the peak RSS of the
    atlas pass grew ~2x from N to 10N tokens although the pass holds no more data
    (benchmarks/results/bench_atlas.md). Costs a few milliseconds; call it between shards."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
