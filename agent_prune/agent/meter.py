"""Wall time and peak memory of a stretch of a run (a graph node, or a phase inside one).

Peak resident memory comes from ``VmHWM`` in ``/proc/self/status``. Linux resets that high-water
mark when ``5`` is written to ``/proc/self/clear_refs``, so each measured stretch reports its own
peak rather than the process's; where the reset is refused (not Linux, or a locked-down /proc) the
figure is the process peak so far and the record says so (``peak_scope: "process"``). On CUDA the
allocator's peak is reset and read the same way. Measurements nest: a phase inside a node resets
the high-water mark, so the node keeps the largest peak its phases saw. Each stretch starts on a
trimmed heap (``heap.release_memory``), so its peak does not hold the pages the stretch before it
freed.

CPU time (user and system) and minor page faults come from ``getrusage`` of this process (worker
processes are not in them): a stretch whose system time is a large share of its CPU time spends it
in the kernel, most often faulting in freshly mapped memory.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path
from typing import ClassVar

from agent_prune.heap import release_memory

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024 * 1024


def status_kib(field: str, text: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of a ``/proc/PID/status`` text."""
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_bytes() -> tuple[int | None, int | None]:
    """(current, peak) resident bytes of this process; the peak falls back to ``ru_maxrss``."""
    try:
        text = STATUS.read_text()
    except OSError:
        text = ""
    current, peak = status_kib("VmRSS", text), status_kib("VmHWM", text)
    if peak is None:  # ru_maxrss is in KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return None, maxrss if sys.platform == "darwin" else maxrss * 1024
    return (current * 1024 if current is not None else None), peak * 1024


def reset_rss_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _cuda():
    """torch.cuda when torch is loaded and CUDA in use; never imports torch or starts CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class Meter:
    """``with Meter() as m: ...`` then ``m.figures()``: seconds, peak and end RSS, CUDA peak (MiB),
    CPU user and system seconds, minor page faults."""

    _open: ClassVar[list[Meter]] = []  # the measurements in progress, innermost last

    def __enter__(self) -> Meter:
        cuda = _cuda()
        if Meter._open:  # the reset below would lose the enclosing stretch's peak so far
            Meter._open[-1].carry(rss_bytes()[1] or 0, cuda.max_memory_allocated() if cuda else 0)
        release_memory()
        self.scoped = reset_rss_peak()
        self.inner_peak = 0  # the largest peak seen before nested measurements reset the marks
        self.inner_cuda_peak = 0
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        self.usage = resource.getrusage(resource.RUSAGE_SELF)
        self.start = time.perf_counter()
        Meter._open.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        self.seconds = time.perf_counter() - self.start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_user = usage.ru_utime - self.usage.ru_utime
        self.cpu_sys = usage.ru_stime - self.usage.ru_stime
        self.minor_faults = usage.ru_minflt - self.usage.ru_minflt
        Meter._open.remove(self)
        self.rss, peak = rss_bytes()
        self.peak = max(peak or 0, self.inner_peak)
        cuda = _cuda()
        self.cuda_peak = max(cuda.max_memory_allocated() if cuda else 0, self.inner_cuda_peak)
        if Meter._open:
            Meter._open[-1].carry(self.peak, self.cuda_peak)
        return False

    def carry(self, peak: int, cuda_peak: int) -> None:
        self.inner_peak = max(self.inner_peak, peak)
        self.inner_cuda_peak = max(self.inner_cuda_peak, cuda_peak)

    def figures(self) -> dict:
        out = {"duration_s": round(self.seconds, 3), "peak_rss_mb": round(self.peak / MIB, 1),
               "peak_scope": "stretch" if self.scoped else "process",
               "cpu_user_s": round(self.cpu_user, 2), "cpu_sys_s": round(self.cpu_sys, 2),
               "minor_faults": self.minor_faults}
        if self.rss is not None:
            out["rss_mb"] = round(self.rss / MIB, 1)
        if self.cuda_peak:
            out["cuda_peak_mb"] = round(self.cuda_peak / MIB, 1)
        return out
