"""Evaluation throughput: ``agent-prune``'s WikiText-2 perplexity vs a bare batched forward pass.

Both run in the same process, on the same model and the same windows, at the same batch size, in
alternating rounds (so background load hits both alike); the figure is tokens/s from the fastest
round of each, and the ratio eval / bare (target >= 0.8).

    python bench/eval_throughput.py \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data-dir ../shared/data --windows 16 --batch-size 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve on shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's agent_prune

import torch

from agent_prune.data.corpora import split_windows, tokenize_text, wikitext2_text
from agent_prune.evaluation.perplexity import window_nlls
from agent_prune.models.loading import load_model


@torch.inference_mode()
def bare_forward(model, windows: torch.Tensor, batch_size: int) -> None:
    for start in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[start : start + batch_size], use_cache=False)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/eval_throughput.json"))
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device)
    ids = split_windows(tokenize_text(loaded.tokenizer, wikitext2_text(args.data_dir, "test")),
                        args.seqlen, args.windows).to(loaded.model.device)
    tokens = ids.numel()
    bare_forward(loaded.model, ids[: args.batch_size], args.batch_size)  # warm-up
    bare, evaluation = [], []
    for _ in range(args.rounds):
        bare.append(timed(lambda: bare_forward(loaded.model, ids, args.batch_size)))
        evaluation.append(timed(lambda: window_nlls(loaded.model, ids, batch_size=args.batch_size)))
    result = {
        "bare_tokens_per_s": tokens / min(bare), "eval_tokens_per_s": tokens / min(evaluation),
        "bare_median_tokens_per_s": tokens / statistics.median(bare),
        "eval_median_tokens_per_s": tokens / statistics.median(evaluation),
        "bare_seconds": bare, "eval_seconds": evaluation,
        "seqlen": args.seqlen, "windows": int(ids.shape[0]), "tokens": tokens, "batch_size": args.batch_size,
        "rounds": args.rounds, "device": args.device, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    result["ratio"] = result["eval_tokens_per_s"] / result["bare_tokens_per_s"]
    result["median_ratio"] = result["eval_median_tokens_per_s"] / result["bare_median_tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"{'path':<28}{'tokens/s (best)':>16}{'tokens/s (median)':>19}")
    for label, key in (("bare batched forward", "bare"), ("agent-prune perplexity", "eval")):
        print(f"{label:<28}{result[f'{key}_tokens_per_s']:>16.1f}{result[f'{key}_median_tokens_per_s']:>19.1f}")
    print(f"ratio eval/bare: {result['ratio']:.3f} (median {result['median_ratio']:.3f}); "
          f"{tokens} tokens = {ids.shape[0]} x {args.seqlen}, batch {args.batch_size}, {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
