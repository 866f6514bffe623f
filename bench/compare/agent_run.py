"""Run the agent loop once to the largest target (in a worker process), then read its steps.

A run to 30% passes through 10% and 20%, so one run serves every target: for each target the
accepted step whose structural sparsity is nearest to it is exported (the table names the step).
Its pruning time at a target is the wall time from the run's start to that step's acceptance,
read from the run's trace; the whole run's wall time and peak RSS come from the worker.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from agent_prune.io import atomic_write_json, read_json

COST_FILE = "bench_cost.json"


def run_agent(model: str, data_dir: str, out: Path, target: float, planner: str, recovery: str,
              **options) -> dict:
    """Start (or resume) the run in ``out``; return its summary. Called inside a worker process.

    ``options``: further :class:`RunOptions` fields (seqlen, calib_samples, eval_windows, ...); the
    run's own before/after evaluation is off, since the comparison evaluates every row itself.
    """
    from agent_prune.agent.options import FinalEval, RunOptions
    from agent_prune.agent.session import RUN_FILE, resume_run, start_run

    if (out / RUN_FILE).is_file():
        return resume_run(str(out))
    # The run's own test-set evaluation is off; its freebaseqa_limit still sets where the loop's
    # probe questions start, so they stay disjoint from the questions the comparison reports.
    final_eval = FinalEval(**{**options.pop("final_eval", {}), "windows": 0, "speed": False})
    options = RunOptions(model=model, out=str(out), target_sparsity=target, planner=planner,
                         data_dir=data_dir, recovery=recovery, final_eval=final_eval, **options)
    return start_run(options)


def run_peak_mib(out: Path) -> float:
    """The largest per-node peak RSS in the run's trace. The run resets the kernel's high-water mark
    at every node (``agent.meter``), so the worker's own ``VmHWM`` at the end is only the last
    node's peak."""
    from agent_prune.agent.trace import read_trace

    path = out / "trace.jsonl"
    records = read_trace(path) if path.is_file() else []
    return max((r.get("peak_rss_mb", 0.0) for r in records if r["event"] == "node"), default=0.0)


def record_cost(out: Path, cost: dict) -> None:
    """Append one worker invocation's cost (a resumed run has several)."""
    path = out / COST_FILE
    history = read_json(path) if path.is_file() else []
    atomic_write_json(path, [*history, cost])


def accepted_steps(out: Path) -> list[dict]:
    """``[{step, sparsity, seconds_from_start, branch, summary}]`` for every accepted step (0 = dense)."""
    from agent_prune.checkpoints.store import CheckpointStore

    index = CheckpointStore(out / "checkpoints").index()
    started = datetime.fromisoformat(read_json(out / "run.json")["created"])
    accepted = {}
    for line in (out / "trace.jsonl").read_text().splitlines():
        event = json.loads(line)
        step = _accepted_step(event)
        if step is not None:
            accepted[step] = event
    rows = []
    for step in index.steps:
        event = accepted.get(step)
        seconds = (datetime.fromisoformat(event["ts"]) - started).total_seconds() if event else 0.0
        record = read_json(out / "checkpoints" / f"step-{step:04d}" / "record.json")
        rows.append({"step": step, "sparsity": index.sparsity.get(step, 0.0),
                     "seconds_from_start": round(seconds, 1), "branch": (event or {}).get("branch"),
                     "summary": record.get("summary")})
    return rows


def _accepted_step(event: dict) -> int | None:
    accepted = event.get("event") == "decision" and event.get("accepted")
    return event.get("step") if accepted else None


def nearest_step(steps: list[dict], target: float) -> dict:
    """The accepted step whose sparsity is closest to ``target`` (ties: the sparser one)."""
    return min(steps, key=lambda s: (abs(s["sparsity"] - target), -s["sparsity"]))
