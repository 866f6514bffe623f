"""Render the planner prompts (templates in ``agent_prune/prompts/``) from a :class:`PlannerContext`.

Templates use ``string.Template`` (``$name``) so the JSON examples in them need no escaping. The
profile is one compact line per layer so that a 30-layer model fits a small local model's context
(``bench/planner_prompts.py`` measures the token counts).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from string import Template

from agent_prune.agent.planners.base import FailedStep
from agent_prune.agent.planners.budget import open_branches, width_min_layers
from agent_prune.agent.proposal import PRUNERS, PlannerContext, Proposal

PROMPT_DIR = Path(__file__).resolve().parents[2] / "prompts"

# Short column names keep the table narrow; the legend in the prompt spells them out.
METRIC_COLUMNS = {
    "block_influence": "BI",
    "angular_distance": "AD",
    "wanda": "W",
    "wanda_p10": "W10",
    "gradient": "G",
    "taylor": "T",
}


@cache
def template(name: str) -> Template:
    return Template((PROMPT_DIR / f"{name}.md").read_text(encoding="utf-8"))


def metric_names(context: PlannerContext) -> list[str]:
    """Metrics present in the profile, known ones first in a fixed order, then any others."""
    present = {name for row in context.layers for name in row.z}
    known = [m for m in METRIC_COLUMNS if m in present]
    return known + sorted(present - set(known))


def metric_legend(context: PlannerContext) -> str:
    return ", ".join(f"{METRIC_COLUMNS.get(m, m)}={m}" for m in metric_names(context))


def profile_table(context: PlannerContext) -> str:
    """One line per layer: index, source layer, params (M), heads/kv/mlp, z-scores, protected."""
    metrics = metric_names(context)
    header = ["layer", "src", "params", "heads/kv/mlp", "cut", *(METRIC_COLUMNS.get(m, m) for m in metrics)]
    lines = [" ".join(header)]
    for row in context.layers:
        cells = [str(row.index), str(row.source), f"{row.params / 1e6:.2f}",
                 f"{row.heads}/{row.kv_heads}/{row.mlp_channels}", str(row.mlp_cut)]
        cells += [_z(row.z[m]) if m in row.z else "-" for m in metrics]
        if row.protected:
            cells.append("P")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _z(value: float) -> str:
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def history_lines(context: PlannerContext) -> str:
    if not context.history:
        return "none yet"
    lines = []
    for step in context.history:
        probe = f", probe {step.probe_accuracy:.1%}" if step.probe_accuracy is not None else ""
        branch = f"{step.branch}, {step.pruner}" if step.pruner else step.branch
        ahead = step.rival_leads()
        rival = ("; paired lead over the " + ", over the ".join(f"{b} candidate z {z:+.1f}"
                                                            for b, z in sorted(ahead.items()))
                 if ahead else "")
        lines.append(f"- step {step.iteration} ({branch}): {step.summary}; sparsity "
                     f"{step.sparsity:.1%}, perplexity {step.perplexity:.2f}{probe}{rival}")
    return "\n".join(lines)


def reflection_lines(context: PlannerContext) -> str:
    return "\n".join(f"- {r}" for r in context.reflections) if context.reflections else "none"


def budget_layers(context: PlannerContext) -> int:
    """How many average layers the step budget amounts to (at least one)."""
    per_layer = sum(r.params for r in context.layers) / max(len(context.layers), 1)
    return max(1, round(context.step_budget_params / per_layer)) if per_layer else 1


def branches_line(context: PlannerContext) -> str:
    line = ", ".join(open_branches(context))
    if "depth" in context.branches and "depth" not in open_branches(context):
        line += (" (depth is not possible this step: every removable layer is over twice the budget "
                 "or over what is left to the target)")
    return line


def propose_messages(context: PlannerContext) -> list[dict]:
    user = template("propose").substitute(
        iteration=context.iteration,
        num_layers=context.num_layers,
        current_sparsity=f"{context.current_sparsity:.1%}",
        target_sparsity=f"{context.target_sparsity:.1%}",
        budget_params=f"{context.step_budget_params:,}",
        budget_fraction=f"{context.step_budget_fraction:.1%}",
        budget_layers=budget_layers(context),
        metric_legend=metric_legend(context),
        profile_table=profile_table(context),
        history=history_lines(context),
        reflections=reflection_lines(context),
        rejected_layers=", ".join(map(str, context.rejected_layers)) or "none",
        branches=branches_line(context),
        width_min=width_min_layers(context),
        pruners="; ".join(f"{name}: {PRUNERS[name]}" for name in context.pruners) + ".",
    )
    return _chat(user)


def reflect_messages(context: PlannerContext, failed: FailedStep) -> list[dict]:
    candidates = "\n".join(f"Candidate: {json.dumps(c, default=str)}" for c in failed.candidates)
    user = template("reflect").substitute(
        iteration=failed.iteration,
        proposal=_compact_proposal(failed.proposal),
        outcome=failed.outcome,
        candidates=candidates + "\n" if candidates else "",
        metric_legend=metric_legend(context),
        profile_table=profile_table(context),
        reflections=reflection_lines(context),
    )
    return _chat(user)


def repair_message(problems: list[str]) -> dict:
    text = template("repair").substitute(problems="\n".join(f"- {p}" for p in problems))
    return {"role": "user", "content": text.strip()}


def _compact_proposal(proposal: Proposal) -> str:
    return json.dumps(proposal.model_dump(exclude_none=True), separators=(", ", ": "))


def _chat(user: str) -> list[dict]:
    return [{"role": "system", "content": template("system").template.strip()},
            {"role": "user", "content": user.strip()}]
