"""``RUN_DIR/report.md``: before/after table, accepted steps, rollbacks, plots, protocol."""

from __future__ import annotations

from pathlib import Path

from agent_prune.agent.trace import read_trace
from agent_prune.io import atomic_write_text
from agent_prune.reporting.plots import plot_layer_map, plot_quality_vs_sparsity
from agent_prune.reporting.timeline import format_estimate

# (task, metric, label, percent?) rows of the before/after table, when present
QUALITY_ROWS = (
    ("wikitext2", "perplexity", "WikiText-2 test perplexity", False),
    ("freebaseqa", "mc_accuracy", "FreebaseQA multiple-choice accuracy", True),
    ("freebaseqa", "mc_margin", "FreebaseQA multiple-choice margin (nats)", False),
    ("freebaseqa", "exact_match", "FreebaseQA exact match (LLM-KICK)", True),
    ("freebaseqa", "gold_loglik", "FreebaseQA gold log-likelihood (reported only)", False),
    ("arc_easy", "acc", "ARC-Easy accuracy", True),
    ("arc_easy", "acc_norm", "ARC-Easy accuracy (length-normalised)", True),
    ("arc_challenge", "acc", "ARC-Challenge accuracy", True),
    ("csqa", "acc", "CommonsenseQA accuracy", True),
    ("mmlu", "acc", "MMLU (dev) accuracy", True),
)


def _value(entry: dict, metric: str, percent: bool) -> str:
    if metric not in entry:
        return "-"
    value, se = entry[metric], entry.get(f"{metric}_se", 0.0)
    return f"{100 * value:.1f}% ± {100 * se:.1f}" if percent else f"{value:.3f} ± {se:.3f}"


def before_after_rows(final: dict) -> list[tuple[str, str, str]]:
    rows = []
    params = final.get("params", {})
    if params:
        dense, pruned = params["dense"], params["pruned"]
        rows.append(("parameters (total)", f"{dense['total']:,}", f"{pruned['total']:,}"))
        rows.append(("prunable parameters", f"{dense['prunable']:,}", f"{pruned['prunable']:,}"))
        rows.append(("structural sparsity", "0.0%", f"{100 * pruned['structural_sparsity']:.1f}%"))
    sizes = final.get("file_size", {})
    if sizes:
        label = (f"GGUF file size ({final['gguf']['quant']})" if final.get("gguf")
                 else "weights file size")
        rows.append((label, _mb(sizes.get("dense")), _mb(sizes.get("pruned"))))
    evaluation = final.get("evaluation") or {}
    if evaluation:
        for task, metric, label, percent in QUALITY_ROWS:
            dense = evaluation["dense"].get(task, {})
            pruned = evaluation["pruned"].get(task, {})
            if metric in dense or metric in pruned:
                rows.append((label, _value(dense, metric, percent), _value(pruned, metric, percent)))
    speed = final.get("speed") or {}
    for key, label in (("prefill_tokens_per_s", "prefill tokens/s"),
                       ("decode_tokens_per_s", "decode tokens/s")):
        if key in speed.get("dense", {}):
            rows.append((label, f"{speed['dense'][key]:.0f}", f"{speed['pruned'][key]:.0f}"))
    engine = final.get("llama_cpp_speed") or {}
    for key, label in (("prompt_tokens_per_s", "llama.cpp prompt tokens/s"),
                       ("gen_tokens_per_s", "llama.cpp generation tokens/s")):
        if key in engine.get("dense", {}):
            rows.append((label, f"{engine['dense'][key]:.0f}", f"{engine['pruned'][key]:.0f}"))
    return rows


def _mb(size) -> str:
    return f"{size / 1e6:.1f} MB" if size else "-"


def write_report(run_dir: Path, summary: dict) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    final = summary.get("final", summary)
    records = read_trace(run_dir / "trace.jsonl") if (run_dir / "trace.jsonl").is_file() else []
    lines = [f"# agent-prune report: {Path(summary['options']['model']).name}", ""]
    options = summary["options"]
    lines += [
        f"- status: **{summary['status']}**, structural sparsity {100 * summary['sparsity']:.1f}% "
        f"(target {100 * options['target_sparsity']:.1f}%), {summary['accepted_steps']} accepted steps "
        f"in {summary['iterations']} iterations",
        f"- planner: `{options['planner']}`, recovery: `{options['recovery']}`, "
        f"candidate choice by paired {options['select_by']}",
        f"- exported model: `{final.get('export', '-')}`",
    ]
    if final.get("loads_in"):
        lines.append(f"- loads in: {final['loads_in']}")
    if final.get("mask_sparsity"):
        lines.append(f"- mask sparsity {100 * final['mask_sparsity']:.1f}%: "
                     "masks give no size or speed change")
    lines += ["", "## Before and after", "", "| | dense | pruned |", "|---|---|---|"]
    lines += [f"| {name} | {dense} | {pruned} |" for name, dense, pruned in before_after_rows(final)]
    lines += ["", _protocol(final), ""]
    lines += _steps_section(summary.get("steps", []))
    lines += _rollbacks_section(records)
    points = summary.get("quality_points", [])
    if len(points) >= 1:
        plot_quality_vs_sparsity(points, plots / "quality_vs_sparsity.png")
        lines += ["## Quality along the run", "", "![quality vs sparsity](plots/quality_vs_sparsity.png)", ""]
    if summary.get("layer_map"):
        plot_layer_map(summary["layer_map"], plots / "layers.png")
        lines += ["## What remains of each layer", "", "![per-layer widths](plots/layers.png)", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _protocol(final: dict) -> str:
    evaluation = final.get("evaluation") or {}
    parts = [entry["protocol"] for entry in evaluation.get("dense", {}).values() if "protocol" in entry]
    speed = final.get("speed") or {}
    if speed.get("protocol"):
        parts.append(speed["protocol"])
    if not parts:
        return "_No before/after evaluation was run (--no-final-eval)._"
    text = "Protocol: " + " ".join(f"({i + 1}) {p}." for i, p in enumerate(parts))
    dtypes = sorted({e["dtype"] for states in evaluation.values() for e in states.values() if "dtype" in e})
    if dtypes:  # the weights' dtype (--dtype): the report's forwards never autocast
        text += f" Evaluated in {' and '.join(dtypes)}."
    cached = sorted({e["cache"]["created"] for e in evaluation.get("dense", {}).values() if "cache" in e})
    if cached:  # the dense figures were measured by an earlier run (agent_prune.evaluation.cache)
        text += (f" Dense figures read from the evaluation cache, measured {', '.join(cached)} "
                 "on the same model files, data files, protocol and evaluation code.")
    return text


def _steps_section(steps: list[dict]) -> list[str]:
    lines = ["## Accepted steps", ""]
    if not steps:
        return [*lines, "None.", ""]
    lines += ["| step | iteration | branch | change | sparsity | in-loop ppl | probe acc |",
              "|---|---|---|---|---|---|---|"]
    for s in steps:
        metrics = s.get("metrics", {})
        ppl = format_estimate("perplexity", metrics.get("perplexity"))
        acc = format_estimate("mc_accuracy", metrics.get("mc_accuracy"))
        lines.append(f"| {s['step']} | {s['iteration']} | {s['branch']} | {s['summary']} | "
                     f"{100 * s['sparsity']:.1f}% | {ppl} | {acc} |")
    return [*lines, ""]


def _rollbacks_section(records: list[dict]) -> list[str]:
    rejected = [r for r in records if r["event"] == "decision" and not r.get("accepted")]
    lessons = {r["iteration"]: r.get("lesson", "") for r in records if r["event"] == "reflection"}
    lines = ["## Rollbacks", ""]
    if not rejected:
        return [*lines, "None: every proposed step passed the gates.", ""]
    lines += ["| iteration | why | reflection |", "|---|---|---|"]
    for r in rejected:
        lines.append(f"| {r['iteration']} | {r.get('reason', '')} | {lessons.get(r['iteration'], '')} |")
    return [*lines, ""]
