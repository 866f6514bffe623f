"""PNG plots for the run report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_quality_vs_sparsity(points: list[dict], path: Path) -> Path:
    """In-loop perplexity and probe accuracy (with error bars) of every accepted step.

    ``points``: [{"sparsity", "perplexity": {value, se}, "mc_accuracy": {value, se}}], dense first.
    """
    xs = [100 * p["sparsity"] for p in points]
    fig, ax_ppl = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ppl = [p["perplexity"] for p in points]
    ax_ppl.errorbar(xs, [e["value"] for e in ppl], yerr=[2 * e["se"] for e in ppl], marker="o",
                    color="tab:red", capsize=3, label="perplexity (WikiText-2 val)")
    ax_ppl.set_xlabel("structural sparsity (% of prunable parameters removed)")
    ax_ppl.set_ylabel("perplexity", color="tab:red")
    if all("mc_accuracy" in p for p in points):
        ax_acc = ax_ppl.twinx()
        acc = [p["mc_accuracy"] for p in points]
        ax_acc.errorbar(xs, [100 * e["value"] for e in acc], yerr=[200 * e["se"] for e in acc],
                        marker="s", color="tab:blue", capsize=3, label="FreebaseQA MC accuracy")
        ax_acc.set_ylabel("FreebaseQA multiple-choice accuracy (%)", color="tab:blue")
    ax_ppl.set_title("Quality along the run (in-loop signals, ±2 SE)")
    ax_ppl.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_layer_map(layers: list[dict], path: Path) -> Path:
    """What remains per original layer: removed layers, kept attention heads and MLP channels (%).

    ``layers``: one entry per ORIGINAL layer: {"source", "kept", "heads_kept", "mlp_kept"} with the
    kept shares in [0, 1] (0 for removed layers).
    """
    sources = [entry["source"] for entry in layers]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(layers)), 3.6), dpi=120)
    width = 0.4
    heads = [100 * entry["heads_kept"] for entry in layers]
    mlp = [100 * entry["mlp_kept"] for entry in layers]
    ax.bar([s - width / 2 for s in sources], heads, width, label="attention heads kept",
           color="tab:blue")
    ax.bar([s + width / 2 for s in sources], mlp, width, label="MLP channels kept", color="tab:green")
    for entry in layers:
        if not entry["kept"]:
            ax.axvspan(entry["source"] - 0.5, entry["source"] + 0.5, color="tab:red", alpha=0.25, lw=0)
    ax.set_xlabel("original layer (red: removed)")
    ax.set_ylabel("% kept")
    ax.set_ylim(0, 105)
    ax.set_xticks(sources)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("What remains of each layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
