"""Scoring on a bfloat16 copy on CPU: its speed, and the memory oneDNN's per-shape kernels keep.

Scores the dense model, then ``--cuts`` MLP cuts of random per-layer widths (seeded; 10%, 13%,
16%, ... of the prunable parameters) with the loop's evaluator (the run's defaults: 8 WikiText-2
validation windows of 512, 120 FreebaseQA probes; no KL), each model either as it is (float32) or
as a bfloat16 copy (``--dtype bfloat16``) with its MLP widths padded to shared shapes as a run
scores (``--shared-width``; 0 for none). Prints one JSON line per model: seconds, validation
perplexity, and the process's resident set with the model, at the end of its scoring and after the
model is dropped and the heap trimmed (what stays behind). Run each dtype in a fresh process on an
idle machine:

    python bench/bf16_scoring.py \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data-dir ../shared/data --dtype float32
    python bench/bf16_scoring.py ... --dtype bfloat16

Why: bfloat16 matrix products go through oneDNN, which builds (JIT) and caches a kernel, with its
buffers, for every shape it meets. The dense model's layers share a handful of shapes; a pruned
model's layers each have their own width unless padded (``precision.pad_mlp_widths``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from agent_prune.evaluation.loop import LoopEvaluator
from agent_prune.heap import configure_heap, release_memory
from agent_prune.models.adapters import adapter_for
from agent_prune.models.loading import load_model
from agent_prune.models.precision import SHARED_WIDTH, cast_parameters, pad_mlp_widths
from bench._shared import rss_bytes
from bench.width_pruners import mlp_cut


def random_cut(dense, sparsity: float, seed: int, allocation: str):
    generator = torch.Generator().manual_seed(seed)
    adapter = adapter_for(dense)
    width = adapter.mlp_projections(adapter.layers()[0])["down_proj"].in_features
    scores = [{"mlp_channels": torch.rand(width, generator=generator).tolist()} for _ in adapter.layers()]
    return mlp_cut(dense, sparsity, scores, scores, allocation)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    p.add_argument("--cuts", type=int, default=3)
    p.add_argument("--shared-width", type=int, default=SHARED_WIDTH,
                   help="pad each layer's MLP width in the bfloat16 copy to a multiple of this, as a run "
                        f"scores (default {SHARED_WIDTH}; 0: no padding)")
    p.add_argument("--allocation", choices=("global", "even"), default="global",
                   help="global: each layer its own width (as the loop cuts); even: every layer one width")
    args = p.parse_args(argv)
    configure_heap()  # as the CLI does
    loaded = load_model(args.model)
    dense = loaded.model
    for param in dense.parameters():
        param.data.add_(0)  # fault the whole model in, so the RSS below compares like with like
    evaluator = LoopEvaluator(loaded.tokenizer, Path(args.data_dir), kl_windows=0, ppl_windows=8,
                              probe_questions=120)
    dtype = getattr(torch, args.dtype)
    for index in range(args.cuts + 1):
        name = "dense" if index == 0 else f"cut {0.1 + 0.03 * (index - 1):.2f}"
        if index:
            model = random_cut(dense, 0.1 + 0.03 * (index - 1), seed=index, allocation=args.allocation)
        else:
            model = dense if dtype == torch.float32 else copy.deepcopy(dense)
        if dtype != torch.float32:  # in place: the cut and the copy are this loop's own
            cast_parameters(model, dtype)
            if args.shared_width:
                pad_mlp_widths(model, args.shared_width)
        release_memory()
        with_model = rss_bytes() >> 20
        started = time.perf_counter()
        record = evaluator.score(model)
        seconds, at_end = time.perf_counter() - started, rss_bytes() >> 20
        del model
        release_memory()
        print(json.dumps({"dtype": args.dtype, "model": name, "seconds": round(seconds, 1),
                          "validation_perplexity": round(record.perplexity.value, 3),
                          "rss_with_model_mib": with_model, "rss_after_scoring_mib": at_end,
                          "rss_after_release_mib": rss_bytes() >> 20}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
