"""GGUF exports in llama.cpp: perplexity against transformers, file sizes, tokens/s dense vs pruned.

    python -m bench.gguf_speed \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --actions bench/gguf_demo_actions.json --data-dir ../shared/data --out bench/results/gguf_speed.json

The pruned model is a finished run's best step (``--run RUN_DIR``, e.g. the README demo's) or
else the actions file applied to the input (weight-magnitude selection, as ``agent-prune apply``
does). Dense and pruned are written by the same GGUF writer at the same types
(the input's, and Q8_0), so the file and speed pairs compare like with like. Perplexity: WikiText-2
test, tokenised once by the transformers tokenizer, the same non-overlapping windows for both engines
(llama.cpp's own logits). Speed: :func:`agent_prune.evaluation.llamacpp.measure_speed` (interleaved
repetitions, medians). Needs llama-cpp-python (``pip install 'agent-prune[gguf-runtime]'``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from agent_prune.actions import apply_actions, dense_manifest, parse_actions
from agent_prune.data.corpora import split_windows, tokenize_text, wikitext2_text
from agent_prune.data.sources import resolve_data_dir
from agent_prune.evaluation import llamacpp
from agent_prune.evaluation.perplexity import window_nlls
from agent_prune.evaluation.stats import perplexity_estimate
from agent_prune.models.accounting import count_parameters
from agent_prune.models.gguf_export import export_gguf
from agent_prune.models.loading import load_model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def work_parameters(model: torch.nn.Module) -> int:
    """Weights that do multiply-adds per token: every Linear (layers and lm_head); not the lookup table."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def pruned_model(args, dense: torch.nn.Module):
    """The model to compare with ``dense`` and its manifest: a run's best step, or the actions."""
    if args.run is None:
        pruned = copy.deepcopy(dense)
        actions = parse_actions(Path(args.actions).read_text())
        return pruned, apply_actions(pruned, actions, dense_manifest(pruned))
    from agent_prune.agent.resources import RunResources
    from agent_prune.agent.session import read_run_options
    from agent_prune.agent.states import ModelStates

    states = ModelStates(RunResources(read_run_options(args.run)))
    return states.load(states.store.step_dir(states.store.index().best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="input GGUF")
    parser.add_argument("--run", default=None, help="a finished run whose best step is the pruned model")
    parser.add_argument("--actions", default="bench/gguf_demo_actions.json",
                        help="without --run: actions that make the pruned model")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/gguf_speed",
                        help="folder for the four GGUF files (about 450 MB; runs/ is not tracked)")
    parser.add_argument("--out", default="bench/results/gguf_speed.json")
    args = parser.parse_args()
    llamacpp.require_llama_cpp()  # the benchmark may not skip the engine
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model)
    dense = loaded.model
    pruned, manifest = pruned_model(args, dense)
    counts = count_parameters(pruned, base_prunable=count_parameters(dense).prunable)
    files = {}
    exports = {}
    for quant in (None, "Q8_0"):
        for name, model, shape in (("dense", dense, dense_manifest(dense)), ("pruned", pruned, manifest)):
            summary = export_gguf(model, loaded.tokenizer, work / f"{name}-{quant or 'input'}.gguf", shape,
                                  quant=quant, reference=args.model)
            key = f"{name}_{summary.quant}"
            files[key] = summary.path
            exports[key] = summary.model_dump()
            llamacpp.check_engine(summary.path)  # a build that crashes says so, instead of a segfault

    data_dir = resolve_data_dir(args.data_dir)
    ids = tokenize_text(loaded.tokenizer, wikitext2_text(data_dir, "test"))
    windows = split_windows(ids, args.seqlen, args.windows)
    ppl = {"transformers_fp32_dense": perplexity_estimate(window_nlls(dense, windows)).value,
           "transformers_fp32_pruned": perplexity_estimate(window_nlls(pruned, windows)).value}
    for key, path in files.items():
        ppl[f"llama_cpp_{key}"] = perplexity_estimate(llamacpp.window_nlls(path, windows, args.threads)).value

    start = time.time()
    speed = llamacpp.measure_speed(files, ids[: llamacpp.PROMPT_TOKENS].tolist(), repeats=args.repeats,
                                   threads=args.threads)
    ideal = work_parameters(dense) / work_parameters(pruned)
    ratios = {}
    for quant in {e["quant"] for e in exports.values()}:
        d, p = speed[f"dense_{quant}"], speed[f"pruned_{quant}"]
        prompt_ratio = p["prompt_tokens_per_s"] / d["prompt_tokens_per_s"]
        gen_ratio = p["gen_tokens_per_s"] / d["gen_tokens_per_s"]
        ratios[quant] = {"prompt_speedup": prompt_ratio, "prompt_of_ideal": prompt_ratio / ideal,
                         "gen_speedup": gen_ratio, "gen_of_ideal": gen_ratio / ideal}
    prompt_text = loaded.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    result = {
        "model": args.model, "pruned_from": args.run or args.actions,
        "pruned": {"structural_sparsity": counts.structural_sparsity, "total_params": counts.total,
                   "layers": len(manifest.layers), "widths": [w.model_dump() for w in manifest.widths()]},
        "input_gguf_bytes": os.path.getsize(args.model),
        "exports": exports, "perplexity": ppl,
        "perplexity_protocol": f"WikiText-2 test, seqlen {args.seqlen}, first {windows.shape[0]} windows, "
                               "same token ids for both engines",
        "speed": speed, "speed_seconds": round(time.time() - start, 1),
        "ideal_ratio": ideal, "ideal_definition": "dense / pruned weights of all Linear layers (lm_head "
                                                  "included, embedding lookup not)", "ratios": ratios,
        "generation": {key: llamacpp.greedy_text(path, prompt_text, threads=args.threads)
                       for key, path in files.items() if key.startswith("pruned")},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), load {os.getloadavg()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(json.dumps({k: result[k] for k in ("perplexity", "ratios", "ideal_ratio", "generation")}, indent=1))


if __name__ == "__main__":
    main()
