"""Which quality signals can the agent trust? Reproduces issue 10's table and measures KL's ranking power.

1. Dense vs ShortGPT-20% (the 6 of 30 layers with the lowest Block Influence removed; Men et al.,
   arXiv 2403.03853) vs uniform MLP width 20% (the same share of prunable parameters removed as MLP
   channels in every layer, lowest Wanda-structured score ``||X_j|| * sum_i |W_down[i, j]|`` first;
   Sun et al. arXiv 2306.11695, An et al. arXiv 2312.11983): LLM-KICK exact match, gold-answer
   log-likelihood, 4-way FreebaseQA multiple choice (accuracy, margin) on the first N dev questions,
   and WikiText-2 test perplexity, each with its standard error and its paired difference vs dense.
2. Over real candidates (depth and width, several sizes): the in-loop signals of ``LoopEvaluator``
   (KL to dense on held-aside C4, validation perplexity, MC probe on questions 300+) against
   WikiText-2 test perplexity, as Spearman rank correlations.

Calibration (Block Influence, channel norms): C4 windows drawn from all but the last 100 local
documents (those are the KL windows), seed 0. Writes JSON and ``docs/signals.md``.

    python bench/signals.py --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve on shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's agent_prune

import torch

from agent_prune.data.corpora import (
    c4_documents,
    calibration_windows,
    split_windows,
    tokenize_text,
    wikitext2_text,
)
from agent_prune.evaluation.harness import freebaseqa_task
from agent_prune.evaluation.loop import KL_HELD_ASIDE_DOCUMENTS, LoopEvaluator
from agent_prune.evaluation.perplexity import window_nlls
from agent_prune.evaluation.progress import NO_PROGRESS
from agent_prune.evaluation.stats import compare_paired, perplexity_estimate, spearman_rho
from agent_prune.models.accounting import count_parameters
from agent_prune.models.adapters import adapter_for
from agent_prune.models.loading import load_model
from bench.signals_doc import write_doc


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- calibration statistics -------------------------------------------------------------------
@torch.inference_mode()
def calibration_statistics(model, windows: torch.Tensor) -> tuple[list[float], list[torch.Tensor]]:
    """Block Influence per layer (1 - mean cos(input, output) over tokens) and the L2 norm of every
    down_proj input channel, from one pass over the calibration windows."""
    adapter = adapter_for(model)
    layers = adapter.layers()
    cos_sums, tokens = [0.0] * len(layers), [0] * len(layers)
    sq_norms = [torch.zeros(adapter.mlp_projections(layer)["down_proj"].in_features) for layer in layers]
    hooks = []
    for index, layer in enumerate(layers):
        def block_hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            cos_sums[index] += float(cos.sum())
            tokens[index] += cos.numel()

        def down_hook(module, args, index=index):
            sq_norms[index] += args[0].float().pow(2).flatten(0, -2).sum(0)

        hooks.append(layer.register_forward_hook(block_hook, with_kwargs=True))
        hooks.append(adapter.mlp_projections(layer)["down_proj"].register_forward_pre_hook(down_hook))
    try:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [1.0 - c / n for c, n in zip(cos_sums, tokens)], [s.sqrt() for s in sq_norms]


# ---- candidates (physical surgery) ------------------------------------------------------------
def depth_candidate(dense, block_influence: list[float], remove: int):
    """ShortGPT: drop the ``remove`` layers with the lowest Block Influence."""
    drop = set(sorted(range(len(block_influence)), key=block_influence.__getitem__)[:remove])
    model = copy.deepcopy(dense)
    adapter_for(model).keep_layers([i for i in range(len(block_influence)) if i not in drop])
    return model, sorted(drop)


def width_candidate(dense, down_norms: list[torch.Tensor], fraction: float):
    """Remove MLP channels uniformly (same count per layer) worth ``fraction`` of prunable parameters.

    Physically slices gate/up rows and down_proj columns, lowest ``||X_j|| * ||W_down[:, j]||_1`` first.
    """
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    prunable = count_parameters(model).prunable
    per_channel = 3 * adapter.hidden_size * adapter.num_layers
    count = round(fraction * prunable / per_channel)
    with torch.no_grad():
        for layer, norms in zip(adapter.layers(), down_norms):
            proj = adapter.mlp_projections(layer)
            score = norms * proj["down_proj"].weight.abs().sum(0)
            keep = torch.sort(torch.argsort(score, descending=True)[: score.numel() - count]).values
            for name in ("gate_proj", "up_proj"):
                proj[name].weight = torch.nn.Parameter(proj[name].weight[keep].clone())
                proj[name].out_features = keep.numel()
            proj["down_proj"].weight = torch.nn.Parameter(proj["down_proj"].weight[:, keep].clone())
            proj["down_proj"].in_features = keep.numel()
    model.config.intermediate_size = model.config.intermediate_size - count
    return model, count


# ---- measurements -----------------------------------------------------------------------------
def test_perplexity(model, windows: torch.Tensor) -> torch.Tensor:
    return window_nlls(model, windows, batch_size=4)


def knowledge_table(models: dict, tokenizer, data_dir: Path, questions: int, test_windows) -> dict:
    """Issue 10's table: every figure with its se, and paired differences vs dense on the same items."""
    rows, vectors = {}, {}
    for name, model in models.items():
        log(f"knowledge probes + test perplexity: {name}")
        entry = freebaseqa_task(model, tokenizer, data_dir, limit=questions, batch_size=4,
                                progress=NO_PROGRESS, per_item=True)
        per_item = entry.pop("per_item")
        nll = test_perplexity(model, test_windows)
        entry["perplexity"] = perplexity_estimate(nll).model_dump()
        vectors[name] = {"hit": per_item["hit"], "gold_loglik": per_item["gold_loglik"],
                         "mc_correct": [float(m > 0) for m in per_item["mc_margin"]],
                         "mc_margin": per_item["mc_margin"], "window_nll": nll.tolist()}
        rows[name] = entry
    directions = {"hit": True, "gold_loglik": True, "mc_correct": True, "mc_margin": True,
                  "window_nll": False}
    for name in models:
        if name == "dense":
            continue
        rows[name]["paired_vs_dense"] = {
            metric: compare_paired(vectors[name][metric], vectors["dense"][metric], metric=metric,
                                   higher_is_better=higher).model_dump()
            for metric, higher in directions.items()
        }
    return rows


def build_candidate(dense, kind: str, amount: float, block_influence, down_norms):
    if kind == "depth":
        model, removed = depth_candidate(dense, block_influence, int(amount))
        return model, {"removed_layers": removed}
    model, count = width_candidate(dense, down_norms, amount)
    return model, {"channels_per_layer": count}


def correlation_study(dense, candidates: dict, build, evaluator: LoopEvaluator, test_windows) -> dict:
    """In-loop signals vs WikiText-2 test perplexity over real candidates; Spearman's rho for each."""
    records, test_ppl = {}, {}
    for name, (kind, amount) in candidates.items():
        model, detail = build(dense, kind, amount)
        log(f"candidate {name}: {detail}")
        record = evaluator.score(model)
        nll = test_perplexity(model, test_windows)
        test_ppl[name] = perplexity_estimate(nll).model_dump()
        dense_prunable = count_parameters(dense).prunable
        records[name] = {
            "detail": detail, "seconds_per_score": record.seconds,
            "structural_sparsity": count_parameters(model, dense_prunable).structural_sparsity,
            **{m: getattr(record, m).model_dump() for m in ("perplexity", "mc_accuracy", "mc_margin", "kl")},
            "test_perplexity": test_ppl[name],
        }
        del model
    names = list(records)
    truth = [test_ppl[n]["value"] for n in names]
    signals = {  # oriented so that larger = worse, like perplexity
        "kl": [records[n]["kl"]["value"] for n in names],
        "validation_perplexity": [records[n]["perplexity"]["value"] for n in names],
        "mc_margin": [-records[n]["mc_margin"]["value"] for n in names],
        "mc_accuracy": [-records[n]["mc_accuracy"]["value"] for n in names],
    }
    return {"candidates": records,
            "spearman_vs_test_perplexity": {k: spearman_rho(v, truth) for k, v in signals.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows (seqlen 512)")
    parser.add_argument("--calibration", type=int, default=16, help="C4 windows for BI and channel norms")
    parser.add_argument("--depths", default="1,2,3,4,6,8")
    parser.add_argument("--widths", default="0.05,0.10,0.15,0.20,0.25")
    parser.add_argument("--ppl-windows", type=int, default=16, help="LoopEvaluator validation windows")
    parser.add_argument("--probe-questions", type=int, default=200, help="LoopEvaluator probe questions")
    parser.add_argument("--out", type=Path, default=Path("bench/results/signals.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/signals.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from the JSON in --out")
    args = parser.parse_args()
    if args.render_only:
        write_doc(json.loads(args.out.read_text()), args.doc)
        return 0
    started = time.perf_counter()

    loaded = load_model(args.model)
    dense, tokenizer = loaded.model, loaded.tokenizer
    documents = c4_documents(args.data_dir)[:-KL_HELD_ASIDE_DOCUMENTS]
    calibration = calibration_windows(tokenizer, documents, args.calibration, 512, seed=0)
    log("calibration statistics")
    block_influence, down_norms = calibration_statistics(dense, calibration)
    test_windows = split_windows(tokenize_text(tokenizer, wikitext2_text(args.data_dir, "test")), 512,
                                 args.windows)

    shortgpt, removed = depth_candidate(dense, block_influence, 6)
    width, channels = width_candidate(dense, down_norms, 0.20)
    table = knowledge_table({"dense": dense, "shortgpt_20": shortgpt, "width_20": width}, tokenizer,
                            args.data_dir, args.questions, test_windows)
    table["shortgpt_20"]["removed_layers"] = removed
    table["width_20"]["channels_removed_per_layer"] = channels
    del shortgpt, width

    log("in-loop evaluator (reference: dense)")
    evaluator = LoopEvaluator(tokenizer, args.data_dir, ppl_windows=args.ppl_windows,
                              probe_questions=args.probe_questions, reference_model=dense)
    dense_record = evaluator.score(dense)
    candidates = {f"depth_{n}": ("depth", int(n)) for n in args.depths.split(",")}
    candidates |= {f"width_{round(float(f) * 100)}": ("width", float(f)) for f in args.widths.split(",")}
    study = correlation_study(
        dense, candidates, lambda model, kind, amount: build_candidate(model, kind, amount, block_influence,
                                                                       down_norms),
        evaluator, test_windows)
    study["dense"] = {m: getattr(dense_record, m).model_dump()
                      for m in ("perplexity", "mc_accuracy", "mc_margin", "kl")}
    study["dense"]["seconds_per_score"] = dense_record.seconds

    result = {
        "table": table, "correlation": study, "block_influence": block_influence,
        "settings": {"questions": args.questions, "test_windows": int(test_windows.shape[0]), "seqlen": 512,
                     "calibration_windows": args.calibration,
                     "loop_evaluator": {"ppl_windows": args.ppl_windows, "probe_offset": 300,
                                        "probe_questions": args.probe_questions, "kl_windows": 4, "seed": 0}},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - started, 1),
        "command": "python bench/signals.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    write_doc(result, args.doc)
    log(f"wrote {args.out} and {args.doc} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
