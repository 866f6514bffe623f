"""Dense vs depth-pruned vs width-pruned exports: size, and prefill/decode speed in stock transformers.

    python bench/export_speed.py [--model GGUF_OR_DIR] [--work runs/bench-export-speed] [--reps 5]

1. With agent-prune, build three exports of the model: dense (no action), depth (remove the
   ``--depth-layers`` layers just before the last one: 23-28 of 30 = 20% of prunable parameters) and
   width (``uniform_width_actions``: the same cut in every layer, one query head per KV group plus
   MLP channels, ~20% of prunable parameters). Cut choice needs no calibration data.
2. In ONE fresh process that imports only torch + transformers, load each export with stock
   ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, check greedy generation,
   and time it: prefill = one forward of ``--seqlen`` tokens (batch 1, KV cache on, logits for the
   last position only, as ``generate`` does); decode = ``--decode-tokens`` single-token steps with the
   KV cache after a ``--context``-token prompt. Repetitions are interleaved (dense, depth, width,
   order rotated each round) so that load from other jobs on the shared CPU hits every variant alike;
   the median is reported. One torch thread by default (see --threads).
Prints a table and writes JSON (default ``bench/results/export_speed.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

# Runs in a fresh interpreter: stock transformers only, no agent_prune import.
CHILD = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
models = {
    name: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    for name, folder in cfg["folders"].items()
}
tokenizer = AutoTokenizer.from_pretrained(next(iter(cfg["folders"].values())))
report = {name: {"class": type(m).__name__, "loaded_parameters": sum(p.numel() for p in m.parameters())}
          for name, m in models.items()}
prompt = tokenizer(cfg["prompt"], return_tensors="pt")
for name, model in models.items():
    out = model.generate(**prompt, max_new_tokens=cfg["gen_tokens"], do_sample=False)
    report[name]["greedy"] = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    report[name]["greedy_tokens"] = int(out.shape[1] - prompt["input_ids"].shape[1])

generator = torch.Generator().manual_seed(0)
ids = torch.randint(0, models["dense"].config.vocab_size, (1, cfg["seqlen"]), generator=generator)

@torch.no_grad()
def prefill(model):
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start

@torch.no_grad()
def decode(model):
    out = model(ids[:, :cfg["context"]], use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(cfg["decode_tokens"]):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start

names = list(models)
for name in names:  # warm-up, not timed
    prefill(models[name]); decode(models[name])
times = {name: {"prefill_s": [], "decode_s": []} for name in names}
for rep in range(cfg["reps"]):
    for name in names[rep % len(names):] + names[:rep % len(names)]:
        times[name]["prefill_s"].append(prefill(models[name]))
        times[name]["decode_s"].append(decode(models[name]))
for name in names:
    report[name]["prefill_s"] = times[name]["prefill_s"]
    report[name]["decode_s"] = times[name]["decode_s"]
    report[name]["prefill_tok_s"] = cfg["seqlen"] / statistics.median(times[name]["prefill_s"])
    report[name]["decode_tok_s"] = cfg["decode_tokens"] / statistics.median(times[name]["decode_s"])
print(json.dumps(report))
"""


def build_exports(model_path: str, work: Path, depth_layers: int, width_fraction: float) -> dict:
    from agent_prune.actions import apply_actions, dense_manifest
    from agent_prune.actions.presets import tail_depth_actions, uniform_width_actions
    from agent_prune.models.accounting import count_parameters
    from agent_prune.models.export import export_model
    from agent_prune.models.loading import load_model

    loaded = load_model(model_path)
    base = dense_manifest(loaded.model, fingerprint=loaded.source.fingerprint())
    variants = {
        "dense": [],
        "depth": tail_depth_actions(base, depth_layers),
        "width": uniform_width_actions(base, width_fraction),
    }
    results = {}
    for name, actions in variants.items():
        model = copy.deepcopy(loaded.model)
        manifest = apply_actions(model, actions, base)
        counts = count_parameters(model, base.base.prunable_parameters)
        summary = export_model(model, loaded.tokenizer, work / name, manifest)
        results[name] = {
            "folder": summary.path, "heterogeneous": summary.heterogeneous,
            "safetensors_bytes": summary.safetensors_bytes, "total_parameters": counts.total,
            "prunable_parameters": counts.prunable, "structural_sparsity": counts.structural_sparsity,
            "actions": [a.action.model_dump() for a in manifest.actions],
            "widths": manifest.widths()[0].model_dump(), "layers": len(manifest.layers),
        }
        del model
    return results


def time_in_fresh_process(exports: dict, args) -> dict:
    cfg = {"folders": {name: info["folder"] for name, info in exports.items()}, "threads": args.threads,
           "seqlen": args.seqlen, "context": args.context, "decode_tokens": args.decode_tokens,
           "reps": args.reps, "prompt": args.prompt, "gen_tokens": 16}
    env = dict(os.environ, PYTHONPATH="")  # the child must not see agent_prune
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                            cwd=tempfile.gettempdir(), env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"timing process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: dict) -> None:
    dense = rows["dense"]
    print(f"{'variant':8} {'layers':>6} {'total params':>13} {'prunable':>11} {'struct.sp':>9} "
          f"{'file MB':>8} {'prefill tok/s':>13} {'x':>5} {'decode tok/s':>12} {'x':>5}")
    for name, row in rows.items():
        print(f"{name:8} {row['layers']:>6} {row['total_parameters']:>13,} {row['prunable_parameters']:>11,} "
              f"{row['structural_sparsity']:>9.4f} {row['safetensors_bytes'] / 1e6:>8.1f} "
              f"{row['prefill_tok_s']:>13.1f} {row['prefill_tok_s'] / dense['prefill_tok_s']:>5.2f} "
              f"{row['decode_tok_s']:>12.1f} {row['decode_tok_s'] / dense['decode_tok_s']:>5.2f}")
    for name, row in rows.items():
        print(f"{name}: greedy -> {row['greedy']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-export-speed"), help="exports go here")
    parser.add_argument("--json-out", default=str(ROOT / "bench" / "results" / "export_speed.json"))
    parser.add_argument("--depth-layers", type=int, default=6)
    parser.add_argument("--width-fraction", type=float, default=0.2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on 2 cores shared with other jobs, 2 threads "
                             "measured 4-5x slower than 1, since each op waits for a descheduled thread)")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()

    exports = build_exports(args.model, Path(args.work), args.depth_layers, args.width_fraction)
    timings = time_in_fresh_process(exports, args)
    rows = {name: exports[name] | timings[name] for name in exports}
    for name, row in rows.items():
        assert row["loaded_parameters"] == row["total_parameters"], name
        assert row["greedy_tokens"] > 0, name
    print_table(rows)
    payload = {"protocol": {k: getattr(args, k) for k in ("model", "depth_layers", "width_fraction", "seqlen",
                                                          "context", "decode_tokens", "reps", "threads")}
               | {"machine": f"{os.cpu_count()} CPU cores, shared with other jobs; fp32; batch 1",
                  "timing": "one fresh process, stock transformers, interleaved repetitions, median"},
               "variants": rows}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
