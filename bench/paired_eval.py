"""Paired comparison of two models evaluated on the same items: every per-item vector that
``agent-prune eval --per-item --json`` wrote for both (WikiText-2 window NLL, FreebaseQA hits,
multiple-choice correctness and margin, ARC correctness), as mean(A - B), its paired standard
error and z.

    agent-prune eval --model A --data-dir ../shared/data --tasks wikitext2,freebaseqa --windows 32 \\
        --limit 300 --per-item --json > a.json        # the same for B > b.json
    python bench/paired_eval.py a.json b.json --json-out bench/results/paired.json

Either side may also be one row of a ``bench/width_pruners.py`` result, named ``FILE#ROW`` (the
row's index, from 0): its per-window WikiText-2 NLLs are compared with the other side's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.evaluation.stats import paired_difference
from agent_prune.io import atomic_write_json


def tasks_of(path: str) -> dict:
    path, _, row = path.partition("#")
    data = json.loads(Path(path).read_text())
    if row:  # a bench/width_pruners.py row: only its WikiText-2 windows are per item
        return {"wikitext2": {"per_item": {"window_nll": data["rows"][int(row)]["window_nll"]}}}
    return data.get("tasks", data)


def numeric_vectors(task: dict) -> dict[str, list[float]]:
    """The task's numeric per-item vectors, plus multiple-choice correctness from the margin."""
    vectors = {name: values for name, values in task.get("per_item", {}).items()
               if all(isinstance(v, (int, float)) for v in values)}
    if "mc_margin" in vectors:
        vectors["mc_correct"] = [float(m > 0) for m in vectors["mc_margin"]]
    return vectors


def compare(a: dict, b: dict) -> list[dict]:
    rows = []
    for task in sorted(set(a) & set(b)):
        items_a, items_b = numeric_vectors(a[task]), numeric_vectors(b[task])
        for name in sorted(set(items_a) & set(items_b)):
            difference = paired_difference(items_a[name], items_b[name])
            rows.append({"task": task, "vector": name, "items": len(items_a[name]),
                         "a_minus_b": difference.value, "se": difference.se,
                         "z": difference.value / difference.se if difference.se else None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    rows = compare(tasks_of(args.a), tasks_of(args.b))
    for row in rows:
        print(json.dumps(row))
    if args.json_out:
        atomic_write_json(Path(args.json_out), {"a": args.a, "b": args.b, "comparisons": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
