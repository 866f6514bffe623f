"""Planner reply statuses of a finished run, read from its trace.

    python bench/planner_trace_shares.py runs/e2e-hf --out bench/results/planner_e2e_hf.json

Counts every planner call of the run (``plan`` and ``reflection`` events): valid without repair,
valid after repair, replaced by the fallback; with the time per call, the fallback reasons and
what was proposed, so the figure in docs/planners.md can be checked against the trace.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.agent.trace import read_trace
from agent_prune.io import atomic_write_json, read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    run = Path(args.run_dir)
    records = read_trace(run / "trace.jsonl")
    calls = [r for r in records if r["event"] in ("plan", "reflection")]
    counts = collections.Counter(r["status"] for r in calls)
    seconds = [r["duration_s"] for r in calls]
    rows = [{"iteration": r["iteration"], "event": r["event"], "status": r["status"],
             "seconds": r["duration_s"], "fallback_reason": r.get("fallback_reason"),
             "attempts": len(r.get("attempts", [])),
             "proposal": r.get("proposal") or {"lesson": r.get("lesson")}} for r in calls]
    summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else {}
    for status in ("valid", "repaired", "fallback"):
        print(f"{status:<9} {counts[status]:>3}/{len(calls)} ({counts[status] / max(len(calls), 1):.0%})")
    if seconds:
        print(f"seconds per call: median {statistics.median(seconds):.1f}, max {max(seconds):.1f}")
    print(f"run status: {summary.get('status')}, sparsity {summary.get('sparsity')}, "
          f"iterations {summary.get('iterations')}")
    if args.out:
        start = next((r for r in records if r["event"] == "start"), {})
        atomic_write_json(Path(args.out), {
            "run_dir": str(run), "planner": start.get("planner"), "options": start.get("options"),
            "calls": len(calls), "counts": dict(counts), "status": summary.get("status"),
            "sparsity": summary.get("sparsity"), "iterations": summary.get("iterations"),
            "seconds_median": statistics.median(seconds) if seconds else None, "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
