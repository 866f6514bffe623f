"""What glibc's heap thresholds cost a run: wall, CPU user/system seconds, minor page faults and peak
RSS of the loop's scoring of one model and of an 8-window profile, under each setting.

    python bench/heap_settings.py --model M.gguf --data-dir ../shared/data [--settings 1,16,glibc]

Each setting runs in a fresh process (glibc reads its thresholds per process): ``N`` fixes the mmap
threshold at N MiB with a 64 MiB trim threshold (``agent_prune.heap.configure_heap``; ``1`` is the
1 MiB threshold that the command line set before, with glibc's default trim threshold), ``glibc``
leaves glibc's dynamic defaults. The scores and profile values are printed too: the heap must not
change a bit of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20


def apply_setting(setting: str) -> None:
    from agent_prune import heap

    if setting == "1":
        heap._LIBC.mallopt(heap.M_MMAP_THRESHOLD, MIB)
    elif setting != "glibc":
        heap.configure_heap(mmap_threshold=int(setting) * MIB)


def measure(name: str, work):
    """``work()`` and its row, measured as the trace measures a node (``agent.meter.Meter``)."""
    from agent_prune.agent.meter import Meter

    with Meter() as meter:
        result = work()
    row = {"what": name, "wall_s": round(meter.seconds, 1), "user_s": round(meter.cpu_user, 1),
           "sys_s": round(meter.cpu_sys, 1), "minor_faults_M": round(meter.minor_faults / 1e6, 2),
           "peak_rss_mib": meter.peak // MIB}
    return result, row


def child(args) -> None:
    apply_setting(args.child)
    from agent_prune.data.corpora import c4_documents, calibration_windows
    from agent_prune.evaluation.loop import LoopEvaluator
    from agent_prune.models.loading import load_model
    from agent_prune.sensitivity import profile_model

    loaded = load_model(args.model)
    data = Path(args.data_dir)
    windows = calibration_windows(loaded.tokenizer, c4_documents(data)[:400], 8, 512, 0)
    evaluator = LoopEvaluator(loaded.tokenizer, data, seqlen=512, ppl_windows=8, probe_questions=120,
                              probe_offset=300, kl_windows=4, reference_model=loaded.model, seed=0,
                              spill_dir=Path(args.spill))
    record, scoring = measure("loop scoring", lambda: evaluator.score(loaded.model))
    profile, profiling = measure("profile, 8 windows",
                                 lambda: profile_model(loaded.model, windows, gradients=False))
    print(json.dumps({"setting": args.child, "rows": [scoring, profiling],
                      "values": {"window_nll": record.window_nll, "window_kl": record.window_kl,
                                 "block_influence": [layer.block_influence for layer in profile.layers]}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--settings", default="1,16,glibc")
    parser.add_argument("--spill", default="/tmp", help="folder for the KL reference file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if any(s != "glibc" and not 1 <= int(s) <= 32 for s in args.settings.split(",")):
        parser.error("mmap thresholds are 1..32 MiB (glibc refuses larger ones)")
    results = []
    for setting in args.settings.split(","):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--data-dir", args.data_dir,
                              "--spill", args.spill, "--child", setting], env=env, check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print("| mmap threshold | what | wall s | CPU user s | CPU sys s | minor faults (M) | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for result in results:
        label = "glibc default" if result["setting"] == "glibc" else f"{result['setting']} MiB"
        for row in result["rows"]:
            print(f"| {label} | {row['what']} | {row['wall_s']} | {row['user_s']} | {row['sys_s']} "
                  f"| {row['minor_faults_M']} | {row['peak_rss_mib']} |")
    same = all(r["values"] == results[0]["values"] for r in results)
    print(f"\nscores and profile values the same bits under every setting: {same}")


if __name__ == "__main__":
    main()
