"""Distillation healing on the shared model: perplexity against healing tokens, with a plot.

Protocol: SmolLM2-135M-Instruct (fp32, CPU, threads as printed) is the teacher; the student is a
pruned model saved by ``bench/recovery.py --save-cut/--save-reconstructed`` (uniform MLP width cut,
~20% of prunable parameters, Wanda-structured channel scores, optionally reconstructed). Healing
trains toward the teacher on C4 training windows (the last 50 C4 documents are held out for the KL
figure); WikiText-2 test perplexity (seqlen 512, first ``--ppl-windows`` windows) at each milestone.
Evaluation time is not counted in the healing budget.

    python bench/healing.py --student /tmp/width20-recon --tokens 200000 --seconds 1200 \
        --json-out bench/results/healing.json --plot docs/healing_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.data.sources import resolve_data_dir
from agent_prune.models.loading import load_model, save_dense
from agent_prune.recovery.calibration import recovery_windows
from agent_prune.recovery.heal import ALL_PROJECTIONS, HealProgress, HealSettings, heal
from bench._shared import perplexity


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="../shared/models/smollm2-135m-instruct")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--student", required=True, help="pruned model folder (from bench/recovery.py)")
    p.add_argument("--label", default="uniform MLP width -20%")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--modules", default=",".join(ALL_PROJECTIONS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--milestones", type=int, default=4, help="perplexity checkpoints along the way")
    p.add_argument("--ppl-windows", type=int, default=32)
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--save", default=None, help="save the healed model to this folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    loaded = load_model(args.model)
    dense, tokenizer = loaded.model, loaded.tokenizer
    student = load_model(args.student).model
    settings = HealSettings(max_tokens=args.tokens, max_seconds=args.seconds, method=args.method,
                            modules=args.modules.split(","), lora_rank=args.rank, lr=args.lr,
                            batch_size=args.batch_size)
    train, heldout = recovery_windows(tokenizer, data_dir, tokens=args.tokens, seqlen=args.seqlen)

    def ppl() -> float:
        return perplexity(student, tokenizer, data_dir, 512, args.ppl_windows)

    curve = [{"tokens": 0, "seconds": 0.0, "perplexity": ppl()}]
    print(f"start: perplexity {curve[0]['perplexity']:.2f}", flush=True)
    marks = [args.tokens * (i + 1) // args.milestones for i in range(args.milestones - 1)]

    def on_step(p: HealProgress) -> None:
        if marks and p.tokens >= marks[0]:
            marks.pop(0)
            curve.append({"tokens": p.tokens, "seconds": p.seconds, "perplexity": ppl(), "train_kl": p.kl})
            print(f"{p.tokens:>9,} tokens  {p.seconds:7.1f} s  perplexity {curve[-1]['perplexity']:.2f}",
                  flush=True)

    started = time.perf_counter()
    report = heal(student, dense, train, settings, eval_windows=heldout, progress=on_step)
    curve.append({"tokens": report.tokens, "seconds": report.seconds, "perplexity": ppl()})
    print(f"{report.tokens:>9,} tokens  {report.seconds:7.1f} s  perplexity {curve[-1]['perplexity']:.2f}  "
          f"KL {report.kl_before:.4f} -> {report.kl_after:.4f}  (stopped by {report.stopped_by})", flush=True)
    result = {"args": vars(args), "threads": torch.get_num_threads(), "curve": curve,
              "kl_before": report.kl_before, "kl_after": report.kl_after, "tokens": report.tokens,
              "heal_seconds": report.seconds, "stopped_by": report.stopped_by,
              "wall_seconds": time.perf_counter() - started, "settings": settings.model_dump()}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(curve, args.plot, f"{args.label}: {args.method}, lr {settings.learning_rate:g}")
    if args.save:
        save_dense(student, tokenizer, Path(args.save))
    return result


def plot(curve: list[dict], path: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["tokens"] for c in curve], [c["perplexity"] for c in curve], marker="o", label=label)
    ax.axhline(28.82, color="grey", linestyle="--", label="dense 28.82")
    ax.axhline(38.0, color="tab:green", linestyle=":", label="goal 38")
    ax.set_xlabel("healing tokens")
    ax.set_ylabel("WikiText-2 perplexity (seqlen 512, 32 windows)")
    ax.set_title("SmolLM2-135M-Instruct, healing toward the dense model")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
