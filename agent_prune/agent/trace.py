"""``RUN_DIR/trace.jsonl``: one JSON record per event of a run, appended and flushed as it happens.

Records carry a timestamp, the iteration, the event kind and its payload (profile summary, prompt,
raw planner reply, proposal, candidates with metrics, decision, reflection, rollback). Secrets never
reach the file: every string is scrubbed of the values of known secret environment variables.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from agent_prune.agent.meter import Meter

SECRET_ENV_VARS = ("OPENAI_API_KEY", "AGENT_PRUNE_PLANNER_API_KEY", "HF_TOKEN")


def secret_values() -> list[str]:
    return [v for name in SECRET_ENV_VARS if (v := os.environ.get(name)) and len(v) >= 8]


def scrub(value, secrets: list[str] | None = None):
    """Replace any secret value inside ``value`` (nested dicts/lists/strings) with ``***``."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


class TraceWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def event(self, kind: str, iteration: int | None = None, duration_s: float | None = None,
              **payload) -> dict:
        record = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "iteration": iteration,
            "event": kind,
        }
        if duration_s is not None:
            record["duration_s"] = round(duration_s, 3)
        record.update(payload)
        line = json.dumps(scrub(record), default=str)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record


    @contextmanager
    def measure(self, kind: str, iteration: int | None = None, **payload) -> Iterator[dict]:
        """Record ``kind`` with the wall time and peak memory of the ``with`` body.

        The body may add fields to the yielded dict (e.g. an iteration known only at the end). Nothing
        is written when the body raises: a rerun after a crash measures the stretch again. Each
        stretch (a graph node, a report task) starts on a trimmed heap (:class:`Meter`)."""
        fields: dict = {"iteration": iteration, **payload}
        with Meter() as meter:
            yield fields
        iteration = fields.pop("iteration")
        self.event(kind, iteration=iteration, **fields, **meter.figures())


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def read_trace(path: str | os.PathLike) -> list[dict]:
    """All complete records; a line cut short by a crash is skipped."""
    records = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
