"""Local reconstruction on the shared model: perplexity before/after, time and peak memory.

Protocol: SmolLM2-135M-Instruct (fp32, CPU); uniform MLP width cut removing ~20% of the prunable
(decoder linear) parameters, channels ranked by the Wanda-structured score ||X_j|| * sum_i |W_down[i,j]|
from ``--score-windows`` C4 calibration windows; reconstruction on ``--windows`` C4 windows (seed 0,
the last ``--heldout`` only measured); WikiText-2 test perplexity, seqlen 512, first 32 windows.

    python bench/recovery.py --model ../shared/models/smollm2-135m-instruct --data-dir ../shared/data \
        --windows 64 --json-out bench/results/recovery.json

Memory: reconstruction streams one layer at a time; what it holds beyond the two models is the
hidden states of the calibration windows (dense and pruned, plus one reference per layer), so the
peak grows with windows x seqlen x hidden, not with the number of layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.data.corpora import c4_documents, calibration_windows
from agent_prune.data.sources import resolve_data_dir
from agent_prune.models.accounting import count_parameters
from agent_prune.models.adapters import adapter_for
from agent_prune.models.loading import load_model, save_dense
from agent_prune.recovery.reconstruct import reconstruct
from bench._shared import PeakRss, cut_mlp_channels, perplexity, wanda_mlp_scores


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="../shared/models/smollm2-135m-instruct")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of prunable parameters to remove")
    p.add_argument("--score-windows", type=int, default=32)
    p.add_argument("--windows", type=int, default=64, help="C4 windows for reconstruction")
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=32)
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--scope", choices=("touched", "all"), default="touched")
    p.add_argument("--skip-dense", action="store_true", help="do not re-measure the dense perplexity")
    p.add_argument("--save-cut", default=None, help="save the cut model (before reconstruction) here")
    p.add_argument("--save-reconstructed", default=None, help="save the reconstructed model here")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def mlp_channels_to_keep(adapter, sparsity: float) -> int:
    """Channels per layer so that a uniform MLP cut removes ``sparsity`` of the prunable parameters."""
    layer = adapter.layers()[0]
    prunable = sum(m.weight.numel() for m in adapter.linear_modules(layer).values())
    per_channel = 3 * adapter.hidden_size  # one row of gate and up, one column of down
    width = adapter.layer_widths(layer).intermediate_size
    return width - round(sparsity * prunable / per_channel)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    loaded = load_model(args.model)
    dense, tokenizer = loaded.model, loaded.tokenizer
    calib = calibration_windows(tokenizer, c4_documents(data_dir), max(args.windows, args.score_windows),
                                args.seqlen, seed=0)
    result = {"protocol": {"model": loaded.source.display, "perplexity": "WikiText-2 test, seqlen "
                           f"{args.seqlen}, first {args.ppl_windows} windows", "calibration": "C4, seed 0",
                           "threads": torch.get_num_threads()}, "args": vars(args)}
    if not args.skip_dense:
        result["dense_ppl"] = perplexity(dense, tokenizer, data_dir, args.seqlen, args.ppl_windows)
    started = time.perf_counter()
    scores = wanda_mlp_scores(loaded.adapter, calib[: args.score_windows])
    pruned = copy.deepcopy(dense)
    keep = mlp_channels_to_keep(adapter_for(pruned), args.sparsity)
    cut_mlp_channels(adapter_for(pruned), scores, keep)
    result["cut"] = {"mlp_channels_kept": keep, "score_seconds": time.perf_counter() - started,
                     "structural_sparsity": count_parameters(pruned, count_parameters(dense).prunable)
                     .structural_sparsity}
    result["cut_ppl"] = perplexity(pruned, tokenizer, data_dir, args.seqlen, args.ppl_windows)
    if args.save_cut:
        save_dense(pruned, tokenizer, Path(args.save_cut))
    with PeakRss() as rss:
        sources = list(range(adapter_for(pruned).num_layers))
        report = reconstruct(pruned, dense, sources, calib[: args.windows], ridge=args.ridge,
                             heldout=args.heldout, scope=args.scope)
    result["reconstruction"] = {
        "seconds": report.seconds, "peak_rss_delta_mib": (rss.peak - rss.start) / 2**20,
        "peak_rss_mib": rss.peak / 2**20, "fit_tokens": report.fit_tokens,
        "heldout_tokens": report.heldout_tokens, "refit_modules": len(report.overrides),
        "stream_mib": 2 * args.windows * args.seqlen * adapter_for(dense).hidden_size * 4 / 2**20,
        "layers": [layer.model_dump() for layer in report.layers],
    }
    result["reconstructed_ppl"] = perplexity(pruned, tokenizer, data_dir, args.seqlen, args.ppl_windows)
    if args.save_reconstructed:
        save_dense(pruned, tokenizer, Path(args.save_reconstructed))
    print_table(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    rec = result["reconstruction"]
    rows = [("dense perplexity", result.get("dense_ppl")),
            (f"uniform MLP cut ({result['cut']['structural_sparsity']:.1%}) perplexity", result["cut_ppl"]),
            ("+ reconstruction perplexity", result["reconstructed_ppl"]),
            ("reconstruction seconds", rec["seconds"]),
            ("reconstruction peak RSS delta (MiB)", rec["peak_rss_delta_mib"]),
            ("process peak RSS (MiB)", rec["peak_rss_mib"]),
            ("fit / held-out tokens", f"{rec['fit_tokens']} / {rec['heldout_tokens']}")]
    for name, value in rows:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name:<45} {text:>14}")


if __name__ == "__main__":
    main()
