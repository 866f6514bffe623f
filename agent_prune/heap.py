"""glibc heap settings that keep a run's resident memory near what it uses (no-ops elsewhere)."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed activation-sized blocks otherwise).

    Buffers under glibc's dynamic mmap threshold (up to 32 MiB) live on the heap, and their pages
    stay resident after ``free``; trimming after each layer keeps the process's RSS close to what
    is actually in use. A no-op where ``malloc_trim`` does not exist.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def return_large_blocks_to_the_os(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more by ``mmap``, so its ``free`` unmaps it.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, after which
    activation- and logits-sized buffers come from the heap and their pages stay resident between
    uses: a run's RSS then grows with every distinct buffer size it has seen. A fixed threshold
    stops that growth. Called once at the command line's start; a no-op where ``mallopt`` does not
    exist.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, threshold)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()
