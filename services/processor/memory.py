"""glibc's malloc, as the processor process uses it (the compression workers keep glibc's defaults).

The download threads allocate buffers of an image's size (MBs). glibc would give each thread an arena of
its own (up to 8 per core), each keeping what was freed in it, so peak RSS with 12-megapixel images in
flight grew with the threads. Two arenas bound that and still reuse freed buffers; returning every
large buffer to the system at once instead (mmap threshold 128 KiB, before the fast JPEG path) cost
page faults on every download and hand-off: the processor's own CPU per JPEG fell from 13 to 6 ms
without it (docs/performance.md). What the arenas keep free is handed back once nothing is in flight."""

import ctypes
import os

M_ARENA_MAX = -8  # glibc's mallopt() parameter
_libc = ctypes.CDLL(None)


def limit_arenas() -> None:
    if hasattr(_libc, "mallopt"):  # glibc; other C libraries keep their own ways
        _libc.mallopt(M_ARENA_MAX, int(os.environ.get("MALLOC_ARENA_MAX", 2)))


def return_free_memory() -> None:
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
