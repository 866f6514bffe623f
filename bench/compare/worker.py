"""One method's pruning in its own process, so its time and peak memory are its own.

    python -m bench.compare.worker oneshot --method shortgpt --target 0.2 --recovery none --out DIR ...
    python -m bench.compare.worker mop --target 0.3 --recovery reconstruct --out DIR ...
    python -m bench.compare.worker agent --target 0.3 --planner heuristic --out RUN_DIR ...

Each writes its result beside its output (a state directory, MoP step directories, or an agent run)
together with ``cost``: wall seconds of the pruning itself (model loading excluded), CPU seconds and
the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from bench.compare.cost import holding, measured
from bench.compare.prune import ONE_SHOT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=("oneshot", "mop", "agent", "evaluate"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--target", required=True, type=float)
    parser.add_argument("--method", choices=tuple(ONE_SHOT))
    parser.add_argument("--recovery", choices=("none", "reconstruct"), default="reconstruct")
    parser.add_argument("--planner", default="heuristic")
    parser.add_argument("--seqlen", type=int, default=512, help="evaluation window length")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--calib-samples", type=int, default=16, help="C4 calibration windows")
    parser.add_argument("--state", help="evaluate: state directory to replay (default: the dense model)")
    parser.add_argument("--windows", type=int, default=32, help="evaluate: WikiText-2 test windows")
    parser.add_argument("--freebaseqa", type=int, default=300, help="evaluate: FreebaseQA questions")
    parser.add_argument("--arc", type=int, default=300, help="evaluate: ARC-Easy items")
    parser.add_argument("--agent-options", default="{}", help="JSON of extra agent RunOptions fields")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the model is pruned, calibrated and evaluated")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    from agent_prune.heap import configure_heap

    configure_heap()  # as the command line does: every method's time and memory under the CLI's heap
    jobs = {"oneshot": oneshot_job, "mop": mop_job, "agent": agent_job, "evaluate": evaluate_job}
    return jobs[args.job](args)


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def _setup(args):
    from agent_prune.data.sources import resolve_data_dir
    from agent_prune.models.loading import load_model
    from bench.compare.prune import Calibration

    loaded = load_model(args.model, device=args.device)
    data_dir = resolve_data_dir(args.data_dir)
    calibration = Calibration(samples=args.calib_samples, seqlen=args.calib_seqlen)
    return loaded, data_dir, calibration.windows(loaded.tokenizer, data_dir)


def oneshot_job(args) -> int:
    import copy

    from agent_prune.actions import side_tensors
    from agent_prune.checkpoints.store import write_state_dir
    from agent_prune.models.accounting import count_parameters
    from bench.compare.prune import recover

    loaded, _, windows = _setup(args)
    dense = loaded.model
    cost: dict = {}
    with holding(args.out), measured(cost):
        model = copy.deepcopy(dense)
        manifest, details = ONE_SHOT[args.method](model, windows, args.target, device=args.device)
        details["recovery"] = recover(model, dense, manifest, windows, args.recovery)
    counts = count_parameters(model, base_prunable=manifest.base.prunable_parameters)
    record = {"method": args.method, "target": args.target, "recovery": args.recovery,
              "sparsity": round(counts.structural_sparsity, 6), "cost": cost, **details}
    write_state_dir(args.out, manifest.model_dump(mode="json"), side_tensors(model, manifest), record)
    print(json.dumps({"sparsity": record["sparsity"], **cost}))
    return 0


def mop_job(args) -> int:
    from agent_prune.data.corpora import c4_documents, calibration_windows
    from agent_prune.evaluation.loop import KL_HELD_ASIDE_DOCUMENTS
    from bench.compare.agent_run import record_cost
    from bench.compare.mop import run_mop

    loaded, data_dir, windows = _setup(args)
    held_aside = c4_documents(data_dir)[-KL_HELD_ASIDE_DOCUMENTS:]
    kl_windows = calibration_windows(loaded.tokenizer, held_aside, 4, args.seqlen, 0)
    cost: dict = {"status": "stopped"}
    try:
        with holding(args.out), measured(cost):
            run_mop(loaded.model, windows, kl_windows, args.target, args.recovery, args.out,
                    device=args.device, log=lambda line: print(line, file=sys.stderr, flush=True))
        cost["status"] = "target_reached"
    finally:  # a stopped run still records what it cost so far (it resumes from its last step)
        record_cost(args.out, cost)
    print(json.dumps(cost))
    return 0


def agent_job(args) -> int:
    from bench.compare.agent_run import record_cost, run_agent, run_peak_mib

    cost: dict = {"status": "stopped"}
    try:
        with holding(args.out), measured(cost):
            options = {"seqlen": args.seqlen, "calib_samples": args.calib_samples,
                       "calib_seqlen": args.calib_seqlen, "device": args.device,
                       **json.loads(args.agent_options)}
            summary = run_agent(args.model, args.data_dir, args.out, args.target, args.planner,
                                args.recovery, **options)
        cost.update(status=summary.get("status"), sparsity=summary.get("sparsity"))
    finally:  # a stopped run still records what it cost so far (it resumes where it stopped)
        cost["peak_rss_mib"] = max(cost.get("peak_rss_mib", 0.0), run_peak_mib(args.out))
        record_cost(args.out, cost)
    print(json.dumps(cost))
    return 0


def evaluate_job(args) -> int:
    """Replay + export + reload + evaluate one state into ``OUT/eval.json`` (per-item vectors beside)."""
    from agent_prune.data.sources import resolve_data_dir
    from agent_prune.io import atomic_write_json
    from agent_prune.models.accounting import count_parameters
    from agent_prune.models.loading import load_model
    from bench.compare.evaluate import Protocol, evaluate_export, export_state

    base = load_model(args.model)  # replay and export on the CPU; the export is evaluated on --device
    protocol = Protocol(seqlen=args.seqlen, windows=args.windows, freebaseqa=args.freebaseqa,
                        arc_easy=args.arc)
    state = Path(args.state) if args.state else None
    export = export_state(base.model, base.tokenizer, state, args.out / "model")
    prunable = count_parameters(base.model).prunable
    del base
    data_dir = resolve_data_dir(args.data_dir)
    evaluation, items = evaluate_export(args.out / "model", prunable, data_dir, protocol, args.device)
    atomic_write_json(args.out / "items.json", items)
    atomic_write_json(args.out / "eval.json", {"state": args.state, "protocol": protocol.model_dump(),
                                               "export": export, "eval": evaluation})
    print(json.dumps({"state": args.state, "sparsity": evaluation["sparsity"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
