"""Where a run's wall time and peak memory went, per node, iteration, candidate job and start/finish phase.

    python bench/run_breakdown.py runs/demo [--json]

Reads ``RUN_DIR/trace.jsonl`` (the ``node``, ``phase``, ``candidate_built`` and ``candidate_scored``
records; see agent_prune/reporting/cost.py) and prints markdown tables for docs/benchmarks.md, or the
rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.agent.trace import read_trace
from agent_prune.reporting.cost import (
    breakdown_markdown,
    candidate_rows,
    iteration_rows,
    node_rows,
    phase_rows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--json", action="store_true", help="the rows as JSON instead of markdown")
    args = parser.parse_args()
    path = Path(args.run_dir) / "trace.jsonl"
    if not path.is_file():
        sys.exit(f"{args.run_dir} has no trace.jsonl")
    records = read_trace(path)
    if args.json:
        print(json.dumps({"nodes": node_rows(records), "iterations": iteration_rows(records),
                          "candidates": candidate_rows(records), "phases": phase_rows(records)}, indent=2))
    else:
        print(breakdown_markdown(records), end="")


if __name__ == "__main__":
    main()
