"""Independent reference for ``agent-prune eval``: plain transformers, one sequence at a time, no caching.

Loads the GGUF with ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` (not the package's
loader), reads the data files with ``json``/``open``, and recomputes each figure the slow, obvious way:
perplexity with ``labels=`` per window; LLM-KICK exact match with unbatched ``generate`` (after the
prompt without its trailing space, as the package does); gold and
distractor log-likelihoods from one full ``prompt.rstrip() + " " + answer`` forward each; ARC by full
``"Question: q\\nAnswer: choice"`` forwards. Only the FreebaseQA distractors come from the package
(``draw_distractors``): they define the items, they are not part of the measurement.

    python bench/reference_eval.py \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data-dir ../shared/data --windows 32 --limit 300 --out bench/results/reference_eval.json \\
        [--compare eval.json]   # the output of `agent-prune eval ... --json` on the same settings
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve on shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's agent_prune

import torch

PROMPT = "Please give answer to this question: {question}\nThe answer is "


def load_plain(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def se(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0


@torch.no_grad()
def reference_window_losses(model, tokenizer, data_dir: Path, seqlen: int, windows: int) -> list[float]:
    rows = read_jsonl(data_dir / "wikitext-2-raw" / "wikitext-2-raw-v1.test.jsonl")
    ids = tokenizer("\n\n".join(r["text"] for r in rows), return_tensors="pt").input_ids
    windows_ids = [ids[:, i * seqlen : (i + 1) * seqlen] for i in range(min(windows, ids.shape[1] // seqlen))]
    return [float(model(w, labels=w).loss) for w in windows_ids]


@torch.no_grad()
def answer_loglik(model, tokenizer, context: str, answer: str) -> float:
    """Sum of log p(answer tokens | context) from one forward over the whole string."""
    n_context = len(tokenizer(context).input_ids)
    whole = tokenizer(context + answer, return_tensors="pt").input_ids
    logp = torch.log_softmax(model(whole).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, whole[0, t]]) for t in range(n_context, whole.shape[1]))


@torch.no_grad()
def reference_freebaseqa(model, tokenizer, data_dir: Path, limit: int) -> dict[str, list[float]]:
    from agent_prune.data.tasks import QAItem
    from agent_prune.evaluation.knowledge import draw_distractors

    rows = read_jsonl(data_dir / "freebaseqa" / "freebaseqa_dev.jsonl")
    pool = [QAItem(str(r["id"]), r["question"], tuple(a.lower() for a in r["answers"])) for r in rows]
    items = pool[:limit]
    distractors = draw_distractors(items, pool, 3, seed=0)
    hits, gold, margins = [], [], []
    for item, wrong in zip(items, distractors):
        prompt = PROMPT.format(question=item.question)
        ids = tokenizer(prompt.rstrip(), return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = "".join(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lower().split())
        hits.append(float(any("".join(a.split()) in text for a in item.answers)))
        context = prompt.rstrip()
        best = max(answer_loglik(model, tokenizer, context, " " + a) for a in item.answers)
        best_wrong = max(answer_loglik(model, tokenizer, context, " " + w) for w in wrong)
        gold.append(best)
        margins.append(best - best_wrong)
    return {"hit": hits, "gold_loglik": gold, "mc_margin": margins}


@torch.no_grad()
def reference_arc(model, tokenizer, data_dir: Path, limit: int) -> dict[str, list[float]]:
    rows = read_jsonl(data_dir / "mc" / "arc_easy_validation.jsonl")[:limit]
    correct, correct_norm = [], []
    for row in rows:
        answer = [str(x) for x in row["labels"]].index(str(row["answerKey"]))
        context = f"Question: {row['question']}\nAnswer:"
        lls = [answer_loglik(model, tokenizer, context, " " + c) for c in row["choices"]]
        normed = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, row["choices"])]
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == answer))
        correct_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == answer))
    return {"correct": correct, "correct_norm": correct_norm}


def figures(per_item: dict[str, list[float]], names: dict[str, str]) -> dict[str, float]:
    out = {}
    for metric, vector in names.items():
        values = per_item[vector]
        if metric == "mc_accuracy":
            values = [float(v > 0) for v in values]
        out[metric] = sum(values) / len(values)
        out[f"{metric}_se"] = se(values)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a .gguf file")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/reference_eval.json"))
    parser.add_argument("--compare", type=Path, help="JSON from `agent-prune eval --json` to compare with")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_plain(args.model)
    losses = reference_window_losses(model, tokenizer, args.data_dir, args.seqlen, args.windows)
    mean = sum(losses) / len(losses)
    result = {
        "wikitext2": {"perplexity": math.exp(mean), "perplexity_se": math.exp(mean) * se(losses),
                      "seqlen": args.seqlen, "windows": len(losses)},
        "freebaseqa": {**figures(reference_freebaseqa(model, tokenizer, args.data_dir, args.limit),
                                 {"exact_match": "hit", "gold_loglik": "gold_loglik",
                                  "mc_accuracy": "mc_margin", "mc_margin": "mc_margin"}),
                       "questions": args.limit},
        "arc_easy": {**figures(reference_arc(model, tokenizer, args.data_dir, args.limit),
                               {"acc": "correct", "acc_norm": "correct_norm"}), "items": args.limit},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    compare = json.loads(args.compare.read_text()) if args.compare else {}
    print(f"{'task':<11}{'metric':<14}{'reference':>12}{'agent-prune':>13}{'diff':>11}")
    for task in ("wikitext2", "freebaseqa", "arc_easy"):
        for metric, value in result[task].items():
            if metric.endswith("_se") or metric in ("seqlen", "windows", "questions", "items"):
                continue
            ours = compare.get(task, {}).get(metric)
            shown = f"{ours:>13.4f}{ours - value:>11.2e}" if ours is not None else ""
            print(f"{task:<11}{metric:<14}{value:>12.4f}{shown}")
    print(f"wrote {args.out} ({result['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
