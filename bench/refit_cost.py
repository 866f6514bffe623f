"""Seconds of one local reconstruction (``recovery.reconstruct``) of a one-shot MLP width cut.

Loads the model, profiles it once on the calibration windows, cuts ``--sparsity`` of the prunable
parameters as MLP channels (``bench/width_pruners.py``'s ``l2`` · global cut), then refits copies of
the cut model ``--repeats`` times and prints each refit's seconds and its mean fit error after the
refit. To compare two versions of the refit, run it at both commits back to back on an idle machine:

    python bench/refit_cost.py \
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data-dir ../shared/data --sparsity 0.2 --calib 128 --calib-seqlen 128
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.data.corpora import c4_documents, calibration_windows
from agent_prune.models.loading import load_model
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity import profile_model
from bench.width_pruners import cut_arguments, mlp_cut


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cut_arguments(p, calib=128, calib_seqlen=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    dense = loaded.model
    windows = calibration_windows(loaded.tokenizer, c4_documents(Path(args.data_dir)), args.calib,
                                  args.calib_seqlen, seed=0)
    scores = profile_model(dense, windows, gradients=False).structure_scores("l2")
    model, manifest, _ = mlp_cut(dense, args.sparsity, scores, scores, "global")
    for _ in range(args.repeats):
        refitted, layout = copy.deepcopy(model), copy.deepcopy(manifest)
        started = time.perf_counter()
        report = reconstruct(refitted, dense, layout, windows)
        seconds = time.perf_counter() - started
        cut = [layer for layer in report.layers if layer.modules]
        print(json.dumps({"seconds": round(seconds, 1), "layers_refitted": len(cut),
                          "mean_fit_error_after": sum(layer.fit_error_after for layer in cut) / len(cut)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
