"""Process-wide memory settings that weigh a run's resident memory against time: glibc's heap
thresholds and oneDNN's kernel cache (no-ops where they do not apply)."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed activation-sized blocks otherwise).

    Buffers under the mmap threshold (:func:`configure_heap`) live on the heap; freed ones between
    blocks still in use stay resident (glibc's trim threshold returns only the heap's top), and a
    later buffer that does not fit the holes grows the heap beside them. ``malloc_trim(0)`` returns
    the holes' pages too. The run trims after each profiled layer, after each candidate scored and
    before each measured stretch of the trace (a graph node, a report task): on the README demo a
    node's start held up to 500 MiB of such pages (docs/benchmarks.md, "Trimming the heap"). A trim
    costs milliseconds and the faults of the pages it returned when reused. A no-op where
    ``malloc_trim`` does not exist.

    It also unmaps the file pages of the weights registered with
    :func:`agent_prune.models.mapped.keep_unmapped` (the run's dense model), which stay in the page
    cache for their next use.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    mapped = sys.modules.get("agent_prune.models.mapped")  # imported by whoever registered a model
    if mapped is not None:
        mapped.drop_registered()


def configure_heap(mmap_threshold: int = 16 << 20, trim_threshold: int = 64 << 20) -> None:
    """Fix glibc's thresholds: blocks of ``mmap_threshold`` bytes or more are mapped (and unmapped on
    ``free``); up to ``trim_threshold`` bytes of free heap stay in the process for the next buffer.

    Every layer's forward allocates and frees activation-sized buffers (1-20 MB at 512 tokens on the
    shared model). Mapped, each is faulted in page by page again at every use: with a 1 MiB threshold
    (the setting before this one) loop scoring spent 13.2 of 73 CPU seconds in the kernel and an
    8-window profile 7.1 of 30, over 200 million minor faults a 20% run. At 16 MiB they come from the
    heap and the same work took 31.0 s instead of 37.2 and 13.1 s instead of 15.7 wall, same bits,
    for 70 MiB more at the scoring peak (docs/benchmarks.md, "Heap settings"). A fixed threshold also
    stops glibc raising it with every larger block freed (RSS growing with each buffer size seen).
    Called once at the command line's start (and in each worker); a user's own setting
    (``MALLOC_*_THRESHOLD_``, or the thresholds in ``GLIBC_TUNABLES``) wins; glibc refuses an mmap
    threshold over 32 MiB, and then neither is set; a no-op where ``mallopt`` does not exist.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    own_mmap = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in tunables
    if not own_mmap and not _LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        return  # refused: leave glibc's dynamic thresholds as they are
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ and "trim_threshold" not in tunables:
        _LIBC.mallopt(M_TRIM_THRESHOLD, trim_threshold)


# oneDNN keeps the bfloat16 kernels it builds, each with its buffers, in a cache of 1024 by default: the
# walks' per-layer widths and the probes' batch lengths filled it through a run. A forward of a padded
# model meets about 15 shapes and a walk's layer fewer, so 64 keep what a pass reuses: the README demo
# in bfloat16 ran in 9 min 15 s against 9 min 33 s, per-node peak 2056 MiB against 2282
# (docs/benchmarks.md, "The report in bfloat16"). Float32 products are MKL's, uncached.
ONEDNN_KERNELS = 64


def cap_onednn_kernels(capacity: int = ONEDNN_KERNELS) -> None:
    """Cap oneDNN's kernel cache at ``capacity`` (read at its first kernel, so call before any bfloat16
    product; worker processes inherit it); a user's own ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()
