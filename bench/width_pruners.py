"""Each width pruner of the loop as a one-shot method on the shared model: score x allocation x
compensation, through the project's own code (profile, allocation, actions, reconstruction).

Protocol: SmolLM2-135M-Instruct (fp32, CPU); the MLP channels of ``--sparsity`` of the prunable
(decoder linear) parameters removed in one shot; channel scores from the sensitivity profile on
``--calib`` C4 calibration windows of ``--calib-seqlen`` tokens (512 unless set; seed
``--calib-seed``, 0 unless set; the loop's ``calibration_windows``); allocation ``even`` (the same
count in every layer), ``global`` (the score's own standardised values ranked across layers,
:mod:`agent_prune.agent.allocation`, at most 60% of a layer) or
``global-SCORE`` (ranked by another score's, e.g. ``l2:global-fluctuation:refit`` keeps the L2
choice of channels inside each layer and sizes the layers by fluctuation, as the loop does);
compensation ``none``, ``refit`` (local reconstruction of each cut ``down_proj`` toward the dense
MLP on the same windows), ``bias`` (the removed channels' mean output kept as a bias, FLAP's
compensation, :mod:`agent_prune.recovery.bias`) or ``bias+refit``; scores ``l2``, ``amp``,
``fluctuation``, ``obs`` (profiled with hessians), ``taylor`` (profiled with gradients);
WikiText-2 raw test perplexity, seqlen 512, first 32 windows.

    python bench/width_pruners.py \
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data-dir ../shared/data --json-out bench/results/width_pruners_20.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.agent.candidates import mlp_channel_cost
from agent_prune.data.corpora import (
    c4_documents,
    calibration_windows,
    split_windows,
    tokenize_text,
    wikitext2_text,
)
from agent_prune.data.sources import resolve_data_dir
from agent_prune.evaluation.perplexity import perplexity
from agent_prune.io import atomic_write_json
from agent_prune.models.accounting import count_parameters
from agent_prune.models.adapters import adapter_for
from agent_prune.models.loading import load_model
from agent_prune.recovery.bias import compensate_biases
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity import profile_model
from bench.compare.methods import channels_per_layer


def cut_arguments(p: argparse.ArgumentParser, calib: int, calib_seqlen: int) -> None:
    """The arguments of a bench that cuts the model once: model, data, sparsity, calibration windows."""
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--calib", type=int, default=calib, help="C4 calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=calib_seqlen, help="tokens per calibration window")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cut_arguments(p, calib=32, calib_seqlen=512)
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows' draw")
    p.add_argument("--rows", default="l2:even:none,l2:even:refit,l2:global:none,l2:global:refit,"
                                     "amp:global:refit", help="comma list of score:allocation:compensation")
    p.add_argument("--obs-damping", type=float, default=None,
                   help="damping of the obs scores relative to each H_jj (default: the profile's)")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def wikitext2_test(model, tokenizer, data_dir) -> dict:
    """Perplexity on the first 32 WikiText-2 test windows of 512 and each window's mean NLL (for
    paired comparisons with other rows or with ``bench.compare``'s per-item evaluations)."""
    windows = split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "test")), 512, 32)
    estimate, nlls = perplexity(model, windows)
    return {"ppl": round(estimate.value, 2), "window_nll": [float(x) for x in nlls]}


def mlp_cut(dense, sparsity: float, structures: list[dict], sizing: list[dict], allocation: str):
    """(model, manifest, channels cut per layer): a copy of ``dense`` with ``sparsity`` of its prunable
    parameters removed as MLP channels, each layer's count set by ``allocation`` over the ``sizing``
    scores and the channels inside it chosen by the ``structures`` scores (profile structure scores)."""
    channel = mlp_channel_cost(adapter_for(dense).hidden_size)
    total = round(sparsity * count_parameters(dense).prunable / channel)
    counts = channels_per_layer([s["mlp_channels"] for s in sizing], total, allocation)
    actions = [{"kind": "prune_width", "layer": i, "mlp_channels": c} for i, c in enumerate(counts) if c]
    model = copy.deepcopy(dense)
    manifest = apply_actions(model, actions, dense_manifest(model), scores=dict(enumerate(structures)))
    return model, manifest, counts


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    loaded = load_model(args.model)
    dense = loaded.model
    windows = calibration_windows(loaded.tokenizer, c4_documents(data_dir), args.calib, args.calib_seqlen,
                                  seed=args.calib_seed)
    rows = [tuple(r.split(":")) for r in args.rows.split(",")]
    started = time.perf_counter()
    scores_used = {r[0] for r in rows} | {r[1].split("-", 1)[1] for r in rows if "-" in r[1]}
    damping = {} if args.obs_damping is None else {"obs_damping": args.obs_damping}
    profile = profile_model(dense, windows, gradients="taylor" in scores_used, hessians="obs" in scores_used,
                            **damping)
    profile_s = time.perf_counter() - started
    prunable = count_parameters(dense).prunable
    results = []
    for score, allocation, compensation in rows:
        started = time.perf_counter()
        structures = profile.structure_scores(score)
        allocation, _, sized_by = allocation.partition("-")
        sizing = profile.structure_scores(sized_by) if sized_by else structures
        model, manifest, counts = mlp_cut(dense, args.sparsity, structures, sizing, allocation)
        if "bias" in compensation.split("+"):
            compensate_biases(dense, model, dense_manifest(dense), manifest,
                              [layer.input_means for layer in profile.layers])
        if "refit" in compensation.split("+"):
            reconstruct(model, dense, manifest, windows)
        seconds = time.perf_counter() - started + profile_s
        row = {"score": score, "allocation": allocation + (f"-{sized_by}" if sized_by else ""),
               "compensation": compensation,
               "sparsity": round(count_parameters(model, base_prunable=prunable).structural_sparsity, 4),
               "channels_kept": [len(s["mlp_channels"]) - c for s, c in zip(structures, counts)],
               "seconds": round(seconds, 1), **wikitext2_test(model, loaded.tokenizer, data_dir)}
        print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)
        results.append(row)
        del model
    if args.json_out:
        atomic_write_json(Path(args.json_out), {
            "protocol": {"model": args.model, "sparsity": args.sparsity, "calib_windows": args.calib,
                         "calib_seqlen": args.calib_seqlen, "calib_seed": args.calib_seed,
                         "obs_damping": args.obs_damping,
                         "seqlen": 512, "ppl": "WikiText-2 raw test, seqlen 512, first 32 windows"},
            "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
