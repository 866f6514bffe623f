"""What the refit's ridge pulls toward, and how hard: one-shot L2 width cuts of the shared model,
reconstructed with each setting, judged on held-out calibration windows and WikiText-2 test.

Protocol: SmolLM2-135M-Instruct (fp32, CPU); the MLP channels of ``--sparsity`` of the prunable
(decoder linear) parameters removed in one shot, chosen and allocated by the L2 structure score
(``bench/width_pruners.py``'s ``l2:global``) from a profile of the first 32 of 72 C4 calibration
windows of 512 tokens (seed 0); each row refits on the first ``FIT`` windows and measures the
relative output error of each refitted projection on windows 64-71, which no row fits on; WikiText-2
raw test perplexity, seqlen 512, first 32 windows. A row is ``PRIOR:RIDGE:FIT``, ``PRIOR`` being
``dense`` (the ridge pulls toward the dense weights on the kept inputs, the default) or ``zero``
(plain ridge regression, the refit before 2026-12-06).

    python bench/refit_prior.py \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data-dir ../shared/data --sparsity 0.1 --json-out bench/results/refit_prior_10.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.data.corpora import c4_documents, calibration_windows
from agent_prune.data.sources import resolve_data_dir
from agent_prune.heap import configure_heap
from agent_prune.io import atomic_write_json
from agent_prune.models.loading import load_model
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity import profile_model
from bench._shared import perplexity
from bench.width_pruners import mlp_cut

PROFILE_WINDOWS = 32
HELDOUT = slice(64, 72)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--sparsity", type=float, default=0.1)
    p.add_argument("--rows", help="comma list of prior:ridge:fit_windows",
                   default="zero:0.01:32,dense:0.03:32,dense:0.1:32,dense:0.3:32,dense:1:32,zero:0.01:64,dense:0.3:64")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def mean_error(layers, attribute: str) -> float:
    values = [getattr(layer, attribute) for layer in layers if layer.modules]
    return round(sum(values) / len(values), 5)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_heap()
    data_dir = resolve_data_dir(args.data_dir)
    loaded = load_model(args.model)
    dense = loaded.model
    windows = calibration_windows(loaded.tokenizer, c4_documents(data_dir), HELDOUT.stop, 512, seed=0)
    profile = profile_model(dense, windows[:PROFILE_WINDOWS], gradients=False)
    structures = profile.structure_scores("l2")
    results = []
    for row in args.rows.split(","):
        prior, ridge, fit = row.split(":")
        if int(fit) > HELDOUT.start:
            raise SystemExit(f"at most {HELDOUT.start} fitted windows (the rest are held out)")
        model, manifest, _ = mlp_cut(dense, args.sparsity, structures, structures, "global")
        started = time.perf_counter()
        report = reconstruct(model, dense, manifest, torch.cat([windows[: int(fit)], windows[HELDOUT]]),
                             ridge=float(ridge), prior=prior, heldout=HELDOUT.stop - HELDOUT.start)
        result = {"prior": prior, "ridge": float(ridge), "fit_windows": int(fit),
                  "fit_error_after": mean_error(report.layers, "fit_error_after"),
                  "heldout_error_before": mean_error(report.layers, "heldout_error_before"),
                  "heldout_error_after": mean_error(report.layers, "heldout_error_after"),
                  "ppl": round(perplexity(model, loaded.tokenizer, data_dir), 2),
                  "refit_seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(result), flush=True)
        results.append(result)
        del model
    if args.json_out:
        atomic_write_json(Path(args.json_out), {
            "protocol": {"model": args.model, "sparsity": args.sparsity, "cut": "l2 global, MLP channels",
                         "profile_windows": PROFILE_WINDOWS, "heldout_windows": [HELDOUT.start, HELDOUT.stop],
                         "calibration": "C4, 512-token windows, seed 0",
                         "ppl": "WikiText-2 raw test, seqlen 512, first 32 windows",
                         "errors": "mean over refitted projections of the relative squared output error"},
            "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
