"""Seconds and peak memory of the loop's passes at one compute dtype (``--compute-dtype``).

At the given compute dtype, as a run does: profile the model on the calibration windows, cut
``--sparsity`` of its prunable parameters as MLP channels (``bench/width_pruners.py``'s ``l2`` ·
global cut), refit the cut (``recovery.reconstruct``), and score the cut model with the loop's
evaluator (the run's defaults: 8 WikiText-2 validation windows of 512, 120 FreebaseQA probes, 4 KL
windows) as a run scores (``precision.evaluated_in``: a bfloat16 copy at bfloat16). Prints one
JSON line: each pass's seconds, the refit's mean fit error, the loop's signals and the process's
peak RSS. Run each dtype in a fresh process on an idle machine:

    python bench/compute_dtype.py \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data-dir ../shared/data --compute-dtype float32
    python bench/compute_dtype.py ... --compute-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.data.corpora import c4_documents, calibration_windows
from agent_prune.evaluation.loop import LoopEvaluator
from agent_prune.heap import configure_heap
from agent_prune.models.loading import load_model
from agent_prune.models.precision import compute_dtype, evaluated_in
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity import profile_model
from bench.width_pruners import cut_arguments, mlp_cut


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cut_arguments(p, calib=128, calib_seqlen=128)
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), required=True)
    args = p.parse_args(argv)
    configure_heap()  # as the CLI does
    loaded = load_model(args.model)
    dense, data = loaded.model, Path(args.data_dir)
    windows = calibration_windows(loaded.tokenizer, c4_documents(data), args.calib, args.calib_seqlen, seed=0)
    seconds = {}
    with compute_dtype(args.compute_dtype), tempfile.TemporaryDirectory() as spill:
        started = time.perf_counter()
        scores = profile_model(dense, windows, gradients=False).structure_scores("l2")
        seconds["profile"] = time.perf_counter() - started
        model, manifest, _ = mlp_cut(dense, args.sparsity, scores, scores, "global")
        started = time.perf_counter()
        report = reconstruct(model, dense, manifest, windows)
        seconds["refit"] = time.perf_counter() - started
        with evaluated_in(dense) as reference:  # as a run scores: a bfloat16 copy at bfloat16
            evaluator = LoopEvaluator(loaded.tokenizer, data, reference_model=reference, probe_questions=120,
                                      ppl_windows=8, spill_dir=Path(spill))
        started = time.perf_counter()
        with evaluated_in(model, owned=True) as scored:
            record = evaluator.score(scored)
        seconds["score"] = time.perf_counter() - started
    cut = [layer for layer in report.layers if layer.modules]
    print(json.dumps({
        "compute_dtype": args.compute_dtype, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "mean_fit_error_after": sum(layer.fit_error_after for layer in cut) / len(cut),
        "validation_perplexity": record.perplexity.value, "mc_margin": record.mc_margin.value,
        "kl": record.kl.value, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
