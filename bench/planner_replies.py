"""How often a planner's replies are valid at once, valid after repair, or replaced by the fallback.

    python bench/planner_replies.py \
        --planner hf:../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calls 24 --out bench/results/planner_replies_hf_skeleton.json
    python bench/planner_replies.py --planner openai:smollm2@http://127.0.0.1:8765/v1 \
        --option structured=json_object --calls 8

Contexts are synthetic (``example_context``: the shared model's shape, seeded z-scores), varied
per call: seed = call index, 30 down to 24 layers, 0-3 accepted steps, the step budget one layer
or 1% of the model (which closes the depth branch). Every fourth call is a reflection on a
rolled-back step. The real-loop figure is the one from ``agent-prune run`` (see docs/planners.md);
this bench isolates the planner, so decoding modes and servers can be compared on equal inputs.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.agent.planners.base import FailedStep
from agent_prune.agent.planners.examples import SMOLLM2_LAYER_PARAMS, example_context
from agent_prune.agent.planners.spec import make_planner
from agent_prune.io import atomic_write_json


def context_for(call: int):
    layers = 30 - call % 7
    context = example_context(num_layers=layers, seed=call, history=call % 4)
    if call % 3 == 2:  # a small step: depth closed, width only
        budget = int(0.01 * SMOLLM2_LAYER_PARAMS * 30)
        context = context.model_copy(update={"step_budget_params": budget, "step_budget_fraction": 0.01})
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planner", required=True)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from agent_prune.commands.run import parse_key_values

    notes: list[str] = []
    planner = make_planner(args.planner, notify=notes.append, **parse_key_values(args.option))
    rows = []
    for call in range(args.calls):
        context = context_for(call)
        start = time.monotonic()
        if call % 4 == 3:
            failed = FailedStep(iteration=context.iteration, proposal=planner.propose(context).proposal,
                                outcome="perplexity +60% (gate 50%)")
            start = time.monotonic()
            result = planner.reflect(context, failed)
            answer = result.reflection.model_dump()
        else:
            result = planner.propose(context)
            answer = result.proposal.model_dump()
        rows.append({"call": call, "kind": "reflect" if call % 4 == 3 else "propose",
                     "status": result.status, "seconds": round(time.monotonic() - start, 2),
                     "attempts": len(result.attempts), "reason": result.fallback_reason, "answer": answer})
        detail = result.fallback_reason or json.dumps(answer)
        print(f"{call:>3} {rows[-1]['kind']:<8} {result.status:<9} {rows[-1]['seconds']:>6.1f}s "
              f"{detail[:140]}", flush=True)
    counts = collections.Counter(r["status"] for r in rows)
    shares = {s: counts[s] / len(rows) for s in ("valid", "repaired", "fallback")}
    print(" ".join(f"{s} {counts[s]}/{len(rows)} ({shares[s]:.0%})" for s in shares))
    print(f"median seconds per call {statistics.median(r['seconds'] for r in rows):.1f}")
    if args.out:
        atomic_write_json(Path(args.out), {
            "planner": planner.describe() if hasattr(planner, "describe") else args.planner,
            "calls": len(rows), "counts": dict(counts), "shares": shares, "rows": rows,
            "notes": notes[:50], "machine": platform.platform(), "python": sys.version.split()[0]})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
