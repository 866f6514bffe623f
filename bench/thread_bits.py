"""Do a step's candidates come out the same bits with 1 and 2 torch threads?

    python bench/thread_bits.py --model M.gguf --data-dir ../shared/data --out /tmp/thread-bits

Runs the loop's first iteration (start, profile, plan) once, then builds and scores that step's
candidates again at each thread count, each time with a fresh evaluator (its KL reference is
computed at that thread count, as a worker process computes its own), and prints per candidate
the sha256 of its saved tensors and of each of its signals (timings left out) at each thread count,
and which of them differ. A second call with the same --out reuses the first's dense scores and
profile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

import torch

from agent_prune.agent.nodes import LoopNodes
from agent_prune.agent.options import RunOptions
from agent_prune.agent.runtime import RunContext
from agent_prune.checkpoints.store import TENSORS_FILE
from agent_prune.io import read_json


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def digests(candidate_dir: Path) -> dict:
    """sha256 of the candidate's side tensors (a depth cut alone has none) and of each signal."""
    tensors = candidate_dir / TENSORS_FILE
    signals = {k: sha(json.dumps(v, sort_keys=True).encode())
               for k, v in read_json(candidate_dir / "signals.json").items() if k != "seconds"}
    return {"tensors": sha(tensors.read_bytes()) if tensors.is_file() else None, **signals}


def differences(results: dict) -> dict:
    """Per candidate, the fields whose digests are not the same at every thread count."""
    runs = list(results.values())
    return {branch: [k for k in runs[0][branch] if len({str(r[branch][k]) for r in runs}) > 1]
            for branch in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--target-sparsity", type=float, default=0.07)
    parser.add_argument("--threads", default="2,1", help="comma list of torch thread counts")
    args = parser.parse_args()
    options = RunOptions(model=args.model, data_dir=args.data_dir, out=args.out,
                         target_sparsity=args.target_sparsity, planner="heuristic")
    ctx = RunContext(options)
    nodes = LoopNodes(ctx)
    state = nodes.start({})
    state |= nodes.profile(state)
    state |= nodes.plan(state)
    results = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        shutil.rmtree(ctx.run_dir / "candidates", ignore_errors=True)
        ctx.scoring.__dict__.pop("evaluator", None)  # a fresh KL reference at this thread count
        built = {**state, **nodes.build(state)}
        scored = nodes.evaluate(built)["candidates"]
        results[threads] = {c["branch"]: digests(Path(c["dir"])) for c in scored}
    print(json.dumps({"torch": torch.__version__, "differ": differences(results), "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
