"""Decisions and candidate metrics of tiny-model runs (recovery none, reconstruct, distill) as JSON.

    cd CHECKOUT && AGENT_PRUNE_EVAL_CACHE=off python bench/loop_decisions.py /tmp/out > decisions.json

Run from two checkouts and compare the files byte for byte to show a change leaves the loop's
decisions alone (used for the memory cuts of issue 16, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

import torch

from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options


def main() -> None:
    torch.set_num_threads(1)
    out = {}
    for recovery in ("none", "reconstruct", "distill"):
        tmp = Path(sys.argv[1]) / recovery
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        heal = {"heal_tokens": 512, "heal_seconds": 30} if recovery == "distill" else {}
        summary = start_run(tiny_run_options(tmp, recovery=recovery, target_sparsity=0.45,
                                             final_eval={"windows": 0, "speed": False}, **heal))
        records = read_trace(tmp / "run" / "trace.jsonl")
        out[recovery] = {
            "decisions": [{k: v for k, v in r.items() if k != "ts"}
                          for r in records if r["event"] == "decision"],
            "scored": [r["metrics"] for r in records if r["event"] == "candidate_scored"],
            "status": summary["status"], "sparsity": summary["sparsity"]}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
