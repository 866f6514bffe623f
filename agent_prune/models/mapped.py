"""Weights mapped from their file count in the resident set only while their pages are mapped in.

transformers maps a safetensors file and lets the parameters read it in place, so a model's weights
are file pages: the first read maps each one in, and it stays in the process's resident set until
the process ends, whether the weights are used again or not. The run's dense model is read in
bursts (a replay copies it, a refit walk reads one layer at a time, the report runs it) and sat in
the resident set in between: 513 MiB of the shared model beside every candidate.

:func:`drop_mapped_pages` unmaps the resident, unmodified file pages behind a module's tensors
(``madvise(MADV_DONTNEED)``). They stay in the kernel's page cache, so the next read maps them back
(a minor fault; a disk read only if the kernel reclaimed them meanwhile): nothing is lost. Only pages
``/proc/self/pagemap`` marks as file pages are unmapped; a page a write made private (copied on
write) is anonymous memory and is never touched. Linux only; elsewhere, and for tensors in ordinary
(anonymous) memory, a no-op.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

MADV_DONTNEED = 4
PRESENT = np.uint64(1 << 63)  # /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
FILE_OR_SHARED = np.uint64(1 << 61)
PAGEMAP = "/proc/self/pagemap"

_REGISTERED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _madvise():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


_MADVISE = _madvise() if os.path.exists(PAGEMAP) else None
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tensor_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The page-aligned address ranges of the CPU storages behind ``tensors``, merged."""
    spans = sorted({(s.data_ptr(), s.data_ptr() + s.nbytes())
                    for t in tensors if t.device.type == "cpu" and (s := t.untyped_storage()).nbytes()})
    merged: list[list[int]] = []
    for start, stop in spans:
        start, stop = start - start % PAGE, -(-stop // PAGE) * PAGE
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(start, stop) for start, stop in merged]


def file_page_runs(start: int, stop: int, pagemap) -> list[tuple[int, int]]:
    """Address runs of resident file pages in ``[start, stop)`` (page-aligned), from ``pagemap``."""
    pagemap.seek(start // PAGE * 8)
    entries = np.frombuffer(pagemap.read((stop - start) // PAGE * 8), dtype=np.uint64)
    mapped = ((entries & PRESENT) != 0) & ((entries & FILE_OR_SHARED) != 0)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mapped, [False])).astype(np.int8)))
    return [(start + int(a) * PAGE, start + int(b) * PAGE) for a, b in zip(edges[::2], edges[1::2])]


def drop_mapped_pages(module: nn.Module) -> int:
    """Unmap the resident file pages behind ``module``'s parameters and buffers; returns the bytes
    unmapped (0 where nothing is mapped from a file, or off Linux)."""
    if _MADVISE is None:
        return 0
    dropped = 0
    try:
        with open(PAGEMAP, "rb") as pagemap:
            for start, stop in tensor_ranges([*module.parameters(), *module.buffers()]):
                for run_start, run_stop in file_page_runs(start, stop, pagemap):
                    if _MADVISE(run_start, run_stop - run_start, MADV_DONTNEED) == 0:
                        dropped += run_stop - run_start
    except OSError:  # a locked-down /proc: keep the pages
        pass
    return dropped


def keep_unmapped(model: nn.Module) -> None:
    """Register ``model`` so that :func:`drop_registered` (called by ``heap.release_memory``) unmaps
    its file pages between uses."""
    _REGISTERED.add(model)


def drop_registered() -> int:
    return sum(drop_mapped_pages(model) for model in list(_REGISTERED))
