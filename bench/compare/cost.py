"""What a method costs: wall time and peak resident memory of the worker process that ran it.

Each pruning method runs in its own worker subprocess (``python -m bench.compare.worker``), so the
peak RSS of one method never includes another's; the worker reads its own high-water mark
(``VmHWM`` from ``/proc/self/status``, else ``getrusage(RUSAGE_SELF)``) when it is done.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".bench.lock"


@contextmanager
def holding(directory: Path):
    """Mark ``directory`` as being worked on by this process (the orchestrator will not start another)."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    lock.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextmanager
def measured(cost: dict):
    """Fill ``cost`` with ``seconds`` (wall) and ``cpu_seconds`` of the block, and the process peak RSS."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        cost["seconds"] = round(time.perf_counter() - wall, 2)
        cost["cpu_seconds"] = round(time.process_time() - cpu, 2)
        cost["peak_rss_mib"] = round(peak_rss_bytes() / 2**20, 1)
