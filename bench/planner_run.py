"""One finished run's planner record as JSON: each step's plan (status, fallback reason, proposal),
decision and kept candidate, the final evaluation, the wall time. Used for the LLM-planner rows of
docs/benchmarks.md ("An LLM planner instead of the heuristic").

    python bench/planner_run.py /tmp/runs/llm20 --command "agent-prune run ..." \\
        --server "python -m llama_cpp.server ..." --json-out bench/results/loop_20_llm_planner.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.agent.trace import read_trace
from agent_prune.io import atomic_write_json, read_json


def record(run: Path) -> dict:
    events = read_trace(run / "trace.jsonl")
    summary = read_json(run / "summary.json")
    plans = [{"iteration": e["iteration"], "status": e["status"], "fallback_reason": e.get("fallback_reason"),
              "seconds": e.get("duration_s"), "replies": len(e.get("attempts", [])),
              "proposal": e.get("proposal")}
             for e in events if e["event"] == "plan"]
    decisions = [{"iteration": e["iteration"], **{k: e.get(k) for k in ("accepted", "branch", "reason")}}
                 for e in events if e["event"] == "decision"]
    stamps = [datetime.fromisoformat(e["ts"]) for e in events if "ts" in e]
    return {"status": summary["status"], "accepted_steps": summary["accepted_steps"],
            "sparsity": summary["sparsity"], "plans": plans, "decisions": decisions,
            "evaluation": summary["final"].get("evaluation"),
            "wall_s": round((max(stamps) - min(stamps)).total_seconds()) if stamps else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished run's --out folder")
    p.add_argument("--command", default=None, help="the run's command line, recorded as given")
    p.add_argument("--server", default=None, help="how the planner's endpoint was served, recorded as given")
    p.add_argument("--commit", default=None, help="the run's commit (default: HEAD here)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    head = git.stdout.strip()
    result = {"command": args.command, "server": args.server, "commit": args.commit or head or None,
              **record(args.run)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("plans", "evaluation")}, indent=1))
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
