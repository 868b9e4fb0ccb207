"""Make CPU timings repeatable: keep freed memory in the process instead of returning it to the OS."""
from __future__ import annotations

import ctypes


def keep_freed_memory() -> str:
    """Stop glibc from returning large freed blocks to the OS after every forward pass; says what it did.

    By default glibc serves big allocations (a batch-64 activation is several MB) with mmap and
    unmaps them on free, so every forward pays page faults that depend on the allocator's recent
    history rather than on the model: the same dense resnet20 timed 60 or 85 ms at batch 64 in two
    processes. Pinning the thresholds (what jemalloc/tcmalloc, common for CPU inference, do anyway)
    makes timings repeatable; it speeds up the dense model most, so speed-ups only get smaller.
    It changes the whole process for good: call it in benchmark processes, not in a library.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "glibc malloc with mmap and trim thresholds pinned at 1 GiB (mallopt)"
    return "default glibc malloc (mallopt refused)"
