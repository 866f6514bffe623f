"""Tables, the doc section and the plot, from the comparison's JSON (pure: no model here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent_prune.io import atomic_write_text

SECTION = "## Agent-prune vs baselines"
LABELS = {"dense": "dense", "shortgpt": "ShortGPT (BI depth)", "wanda_sp": "Wanda-sp (uniform width)",
          "l2_global": "L2 width, global (one shot)", "taylor_global": "Taylor width, global (one shot)",
          "fluctuation_global": "FLAP-style MLP width: fluctuation, global, bias (one shot)",
          "obs_global": "OBS width, global (one shot)",
          "mop": "MoP fixed rule", "agent": "agent-prune"}


def row_label(row: dict) -> str:
    label = LABELS.get(row["method"], row["method"])
    if row["method"] == "agent":
        label += f" ({row['planner']})"
    return label


def _pm(task: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    if key not in task:
        return "-"
    return f"{task[key] * scale:.{digits}f} ± {task[f'{key}_se'] * scale:.{digits}f}"


def quality_rows(result: dict) -> list[list[str]]:
    rows = []
    for row in ordered_rows(result):
        tasks = row["eval"]["tasks"]
        wiki, fqa, arc = tasks["wikitext2"], tasks["freebaseqa"], tasks["arc_easy"]
        rows.append([
            row_label(row), row.get("recovery", "-"), _target(row), f"{row['eval']['sparsity']:.1%}",
            _pm(wiki, "perplexity", digits=2), _pm(fqa, "mc_accuracy", 100), _pm(fqa, "exact_match", 100),
            f"{fqa['gold_loglik']:.2f}", _pm(arc, "acc", 100),
        ])
    return rows


def cost_rows(result: dict) -> list[list[str]]:
    rows = []
    for row in ordered_rows(result):
        speed = result.get("speed", {}).get(_speed_key(row), {}).get(row["id"], {})
        cost = row.get("cost", {})
        rows.append([
            row_label(row), row.get("recovery", "-"), _target(row), f"{row['eval']['params'] / 1e6:.1f}M",
            f"{row['export']['file_bytes'] / 2**20:.0f}", str(row["export"]["layers"]),
            _num(speed.get("prefill_tokens_per_s")), _num(speed.get("decode_tokens_per_s")),
            _num(cost.get("seconds")), _num(cost.get("cpu_seconds")), _num(cost.get("peak_rss_mib")),
            row.get("step_note", ""),
        ])
    return rows


def _num(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _target(row: dict) -> str:
    return "-" if row.get("target") is None else f"{row['target']:.0%}"


def _speed_key(row: dict) -> str:
    return "dense" if row["method"] == "dense" else f"{row['target']:g}"


def ordered_rows(result: dict) -> list[dict]:
    order = list(LABELS)
    rows = [result["dense"], *result["rows"].values()]
    rows = [r for r in rows if r.get("eval")]

    def key(row: dict) -> tuple:
        method = order.index(row["method"]) if row["method"] in order else len(order)
        return row.get("target") or 0.0, method, row.get("recovery", ""), row.get("planner") or ""

    return sorted(rows, key=key)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


QUALITY_HEADER = ["method", "recovery", "target", "sparsity", "WikiText-2 ppl", "FreebaseQA MC %",
                  "FreebaseQA EM %", "gold LL (nats)", "ARC-Easy %"]
COST_HEADER = ["method", "recovery", "target", "params", "file MiB", "layers", "prefill tok/s",
               "decode tok/s", "prune s", "prune CPU s", "peak RSS MiB", "note"]


def tables(result: dict) -> str:
    return (markdown_table(QUALITY_HEADER, quality_rows(result)) + "\n\n"
            + markdown_table(COST_HEADER, cost_rows(result)))


def replace_section(document: str, section: str) -> str:
    """``document`` with its "Agent-prune vs baselines" section replaced by ``section`` (or appended)."""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(document):
        return pattern.sub(lambda _: section.rstrip() + "\n\n", document, count=1)
    head = document.rstrip() + "\n\n" if document.strip() else "# Benchmarks\n\n"
    return head + section.rstrip() + "\n"


def write_doc(path: Path, section: str) -> None:
    document = path.read_text() if path.is_file() else ""
    atomic_write_text(path, replace_section(document, section))


def plot(result: dict, path: Path) -> None:
    """Perplexity, FreebaseQA MC accuracy and ARC-Easy accuracy vs sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = result["dense"]["eval"]["tasks"]
    series: dict[str, list[tuple[float, dict]]] = {}
    for row in result["rows"].values():
        if row.get("eval"):
            name = f"{row_label(row)}, {row['recovery']}"
            series.setdefault(name, []).append((row["eval"]["sparsity"], row["eval"]["tasks"]))
    panels = [("wikitext2", "perplexity", "WikiText-2 test perplexity (log)", 1.0),
              ("freebaseqa", "mc_accuracy", "FreebaseQA multiple-choice accuracy (%)", 100.0),
              ("arc_easy", "acc", "ARC-Easy accuracy (%)", 100.0)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, (task, key, title, scale) in zip(axes, panels):
        for name, points in sorted(series.items()):
            points = sorted([(0.0, dense), *points], key=lambda p: p[0])
            xs = [100 * s for s, _ in points]
            ys = [t[task][key] * scale for _, t in points]
            errs = [t[task][f"{key}_se"] * scale for _, t in points]
            style = "-" if "reconstruct" in name else "--"
            ax.errorbar(xs, ys, yerr=errs, marker="o", linestyle=style, capsize=3, label=name)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("structural sparsity of prunable parameters (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(result.get("title", "agent-prune vs baselines"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def verdict_table(result: dict) -> str:
    rows = [[f"{v['target']:.0%}", ", ".join(v["agent"].split("/")[:2]), v["task"], v["metric"],
             f"{v['agent_value']:.4g}", f"{v['best_baseline']}", f"{v['baseline_value']:.4g}",
             f"{v['z']:+.1f}", v["verdict"]] for v in result.get("verdicts", [])]
    header = ["target", "agent row (planner, recovery)", "task", "metric", "agent-prune",
              "best baseline (by value)",
              "baseline", "paired z", "verdict"]
    return markdown_table(header, rows)


def section(result: dict, plot_path: Path, doc_path: Path) -> str:
    machine, protocol = result["machine"], result["protocol"]
    relative = Path(os.path.relpath(plot_path.resolve(), doc_path.resolve().parent))
    return f"""{SECTION}

Produced by the command below; the table was built by {len(result['invocations'])} resumed
invocation(s), listed with their wall times (sum {result['wall_seconds'] / 60:.0f} min; finished
{result['finished']}). Each later invocation reuses the pruned states and evaluations of the earlier ones.

```
{_invocations(result)}
```

{_machine_text(machine)} Date: {machine['date']}.

Protocol: {protocol['eval_text']}. Errors are ± one standard error over windows / items.
Calibration for every method: {protocol['calibration']}. Speed: {protocol['speed']}
({_speed_protocol(result)}). Parameters count every
tensor once (tied embeddings once); "sparsity" is the structural share of the dense model's
prunable (decoder linear) parameters actually removed. Files are fp32 safetensors exports.
"recovery" says what ran after the cut: `none`, or `reconstruct` (agent-prune's local
reconstruction on the calibration windows; for MoP and agent-prune after every step).

{_missing(result)}### Quality

{markdown_table(QUALITY_HEADER, quality_rows(result))}

### Size, speed and cost

"prune s" is the wall time of the pruning (model loading excluded; for the loops, from the run's
start to the step that was taken, including the loop's own evaluations); "peak RSS" is the peak
resident memory of the worker process that pruned (for the loops, of the whole run).

{markdown_table(COST_HEADER, cost_rows(result))}

### Agent-prune against the best baseline, paired

Per target and metric, the agent-prune row against the baseline row with the best value (any
recovery setting), compared on the same windows / questions (paired differences; a tie when
|z| <= 2). Perplexity is compared on per-window NLL, accuracies on per-item correctness.

{verdict_table(result)}

![perplexity, FreebaseQA and ARC-Easy accuracy vs sparsity]({relative.as_posix()})
"""


def _machine_text(machine: dict) -> str:
    host = (f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} with "
            f"{machine['torch_threads']} threads, Python {machine['python']}; load average at start "
            f"{_load(machine['load_average_at_start'])}, at the end {_load(machine['load_average_now'])}")
    if machine.get("device") == "cuda":
        return (f"Machine: one {machine.get('gpu')} GPU (`--device cuda`: every worker prunes, calibrates "
                f"and evaluates on it, and tokens/s are measured on it, batch 1, fp32, synchronised); "
                f"host {host}. Replays and exports run on the host CPU. Workers run concurrently "
                f"(`--jobs`, `--eval-jobs`), so wall times include sharing the GPU with other workers.")
    return (f"Machine: {host} (the cores are shared with other jobs, so times and tokens/s are noisy; "
            f"speeds of one target are interleaved in one process so that load hits every model alike).")


def _speed_protocol(result: dict) -> str:
    return next((entry["protocol"] for entry in result.get("speed", {}).values() if "protocol" in entry),
                "see JSON")


def _missing(result: dict) -> str:
    parts = []
    if result.get("unreached"):
        parts.append("Loop runs that had not reached a target (no row): "
                     + ", ".join(result["unreached"]) + ".")
    if result.get("not_evaluated"):
        parts.append("Pruned but not evaluated in this invocation (no row): "
                     + ", ".join(result["not_evaluated"]) + ".")
    return "\n".join(parts) + "\n\n" if parts else ""


def _invocations(result: dict) -> str:
    return "\n".join(f"# {i['seconds'] / 60:.0f} min, finished {i['finished']}\n{i['command']}"
                     for i in result["invocations"])


def _load(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)
