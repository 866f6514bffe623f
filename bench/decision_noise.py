"""How reliable are the loop's paired decisions? Per iteration of a finished run, the paired
difference between its two candidates on each in-loop signal, its standard error, z, and how many
items a |z| of 2 would need at the observed effect size.

    python bench/decision_noise.py runs/demo --json-out bench/results/decision_noise.json

Reads only the run directory (``trace.jsonl`` and the candidates' ``signals.json``): no model runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.agent.trace import read_trace
from agent_prune.evaluation.stats import paired_difference
from agent_prune.io import atomic_write_json, read_json

SIGNALS = {"perplexity": "window_nll", "kl": "window_kl", "mc_margin": "question_margin"}


def items_needed(mean: float, sd: float, z: float = 2.0) -> int | None:
    """Items for ``|mean| / (sd / sqrt(n)) >= z``; None when the effect is zero."""
    return math.ceil((z * sd / abs(mean)) ** 2) if mean else None


def compare(depth: dict, width: dict) -> dict:
    rows = {}
    for signal, field in SIGNALS.items():
        a, b = depth.get(field), width.get(field)
        if not a or not b:
            continue
        difference = paired_difference(a, b)
        sd = difference.se * math.sqrt(len(a))
        rows[signal] = {"depth_minus_width": difference.value, "se": difference.se,
                        "z": difference.value / difference.se if difference.se else None,
                        "items": len(a), "items_for_z2": items_needed(difference.value, sd)}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    scored: dict[int, dict[str, str]] = {}
    for record in read_trace(Path(args.run_dir) / "trace.jsonl"):
        if record["event"] == "candidate_built":
            scored.setdefault(record["iteration"], {})[record["branch"]] = record["dir"]
    out = []
    for iteration, dirs in sorted(scored.items()):
        if set(dirs) != {"depth", "width"} or not all((Path(d) / "signals.json").is_file()
                                                       for d in dirs.values()):
            continue  # one branch only, or not scored yet
        signals = {b: read_json(Path(d) / "signals.json") for b, d in dirs.items()}
        row = {"iteration": iteration, **compare(signals["depth"], signals["width"])}
        print(json.dumps(row), flush=True)
        out.append(row)
    if args.json_out:
        atomic_write_json(Path(args.json_out), {"run": args.run_dir, "iterations": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
