"""Render ``bench/signals.py``'s measurements as ``docs/signals.md`` (tables from the JSON, plus the
decision roles stated with the measured figures they rest on)."""

from __future__ import annotations

import os
from pathlib import Path

NAMES = {"dense": "dense", "shortgpt_20": "ShortGPT 6/30 layers", "width_20": "uniform MLP width 20%"}
PAIRED = {"hit": ("exact match", 100), "gold_loglik": ("gold LL (nats)", 1),
          "mc_correct": ("MC accuracy", 100), "mc_margin": ("MC margin (nats)", 1),
          "window_nll": ("test NLL/token (nats)", 1)}


def pm(estimate: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{estimate['value'] * scale:.{digits}f} ± {estimate['se'] * scale:.{digits}f}"


def flat(entry: dict, metric: str) -> dict:
    return {"value": entry[metric], "se": entry[f"{metric}_se"]}


def table_section(result: dict) -> list[str]:
    table, settings = result["table"], result["settings"]
    lines = [
        f"## 1. Dense vs the two 20% baselines ({settings['questions']} FreebaseQA dev questions)", "",
        "| model | exact match % | gold LL (nats) | 4-way MC acc % | MC margin (nats) "
        "| WikiText-2 test ppl |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in NAMES.items():
        row = table[key]
        lines.append(f"| {name} | {pm(flat(row, 'exact_match'), 100)} | "
                     f"{pm(flat(row, 'gold_loglik'), 1, 2)} | {pm(flat(row, 'mc_accuracy'), 100)} | "
                     f"{pm(flat(row, 'mc_margin'), 1, 2)} | "
                     f"{pm(row['perplexity'], 1, 2)} |")
    lines += [
        "", f"ShortGPT removed layers {table['shortgpt_20']['removed_layers']} (lowest Block Influence); "
        f"the width baseline removed {table['width_20']['channels_removed_per_layer']} of 1536 MLP channels "
        "in every layer. "
        f"Perplexity: seqlen {settings['seqlen']}, first {settings['test_windows']} test windows.", "",
        "Paired differences against dense on the same items (pruned minus dense; z = difference / paired se; "
        "`worse` when the pruned model loses by more than 2 se):", "",
        "| model | metric | difference | z | verdict |", "|---|---|---|---|---|",
    ]
    for key in ("shortgpt_20", "width_20"):
        for metric, comparison in table[key]["paired_vs_dense"].items():
            label, scale = PAIRED[metric]
            verdict = {"a": "better", "b": "worse", "tie": "tie"}[comparison["verdict"]]
            lines.append(f"| {NAMES[key]} | {label} | {pm(comparison['difference'], scale, 2)} | "
                         f"{comparison['z']:.1f} | {verdict} |")
    return lines


def correlation_section(result: dict) -> list[str]:
    study, loop = result["correlation"], result["settings"]["loop_evaluator"]
    lines = [
        "## 2. In-loop signals against WikiText-2 test perplexity", "",
        f"`LoopEvaluator` ({loop['ppl_windows']} WikiText-2 *validation* windows, {loop['probe_questions']} "
        f"FreebaseQA questions from index {loop['probe_offset']}, {loop['kl_windows']} held-aside C4 windows "
        "for KL to dense), scored on each candidate, against the test perplexity above.", "",
        "| candidate | removed | sparsity | KL to dense | validation ppl | MC acc % | MC margin | test ppl "
        "| s/score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in study["candidates"].items():
        removed = row["detail"].get("removed_layers", row["detail"].get("channels_per_layer"))
        lines.append(f"| {name} | {removed} | {row['structural_sparsity']:.3f} | {pm(row['kl'], 1, 3)} | "
                     f"{pm(row['perplexity'], 1, 2)} | {pm(row['mc_accuracy'], 100)} | "
                     f"{pm(row['mc_margin'], 1, 2)} | {pm(row['test_perplexity'], 1, 2)} | "
                     f"{row['seconds_per_score']:.0f} |")
    dense = study["dense"]
    lines += [f"| dense | - | 0 | {pm(dense['kl'], 1, 4)} | {pm(dense['perplexity'], 1, 2)} | "
              f"{pm(dense['mc_accuracy'], 100)} | {pm(dense['mc_margin'], 1, 2)} | - | "
              f"{dense['seconds_per_score']:.0f} |", "",
              "Spearman's rank correlation with test perplexity over the pruned candidates (accuracy and "
              "margin negated, so +1 means the signal ranks candidates exactly as test perplexity does):", "",
              "| signal | Spearman rho |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in study["spearman_vs_test_perplexity"].items()]
    return lines


def write_doc(result: dict, path: Path, roles: str = "") -> None:
    header = [
        "# Quality signals the agent can trust", "",
        f"Measured {result['date']} on {result['machine']} by", "", f"    {result['command']}", "",
        f"(everything below comes from `bench/results/signals.json`, {result['seconds']:.0f} s in all). "
        "Every figure is value ± standard error over items (questions or windows); perplexity's error is "
        "the delta method over windows.", "",
    ]
    text = "\n".join([*header, *table_section(result), "", *correlation_section(result), "", roles]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
