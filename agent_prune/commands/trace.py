"""``agent-prune trace RUN_DIR``: the agent's reasoning, iteration by iteration."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent_prune.commands.common import print_json, stdout_console
from agent_prune.errors import InputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace", help="show a run's reasoning timeline",
        description="Show each iteration's proposal and rationale, both candidates with their "
                    "metrics, the decision, reflections and rollbacks.",
        epilog="examples:\n  agent-prune trace runs/r1\n  agent-prune trace runs/r1 --iteration 3\n"
               "  agent-prune trace runs/r1 --json > trace.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir")
    parser.add_argument("--iteration", type=int, help="one iteration in full (prompts, raw replies)")
    parser.add_argument("--json", action="store_true", help="print the records as one JSON object")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from agent_prune.agent.trace import read_trace
    from agent_prune.reporting.timeline import (
        by_iteration,
        render_iteration_detail,
        render_timeline,
    )

    path = Path(args.run_dir) / "trace.jsonl"
    if not path.is_file():
        raise InputError(f"{args.run_dir} has no trace.jsonl",
                         "pass a run directory made by 'agent-prune run'")
    records = read_trace(path)
    if args.iteration is not None:
        grouped = by_iteration(records)
        if args.iteration not in grouped:
            known = sorted(k for k in grouped if k is not None)
            hint = f"iterations present: {known[0]}..{known[-1]}" if known else "the trace is empty"
            raise InputError(f"iteration {args.iteration} is not in this trace", hint)
        records = grouped[args.iteration]
    if args.json:
        print_json({"run_dir": str(args.run_dir), "records": records})
    elif args.iteration is not None:
        render_iteration_detail(args.iteration, records, stdout_console)
    else:
        render_timeline(records, stdout_console)
    return 0
