"""Group a run's trace into iterations and render them for people (``agent-prune trace``)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

METRIC_LABELS = {"perplexity": "ppl", "mc_accuracy": "probe acc", "mc_margin": "probe margin",
                 "kl": "KL"}


def by_iteration(records: list[dict]) -> dict[int | None, list[dict]]:
    grouped: dict[int | None, list[dict]] = defaultdict(list)
    for record in records:
        grouped[record.get("iteration")].append(record)
    return dict(grouped)


def format_estimate(name: str, estimate) -> str:
    if not isinstance(estimate, dict) or "value" not in estimate:
        return str(estimate)
    value, se = estimate["value"], estimate.get("se", 0.0)
    if name == "mc_accuracy":
        return f"{value:.1%} ± {se:.1%}"
    return f"{value:.3g} ± {se:.2g}"


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{METRIC_LABELS.get(k, k)} {format_estimate(k, v)}" for k, v in metrics.items()
                     if isinstance(v, dict))


def describe_proposal(proposal: dict | None) -> str:
    if not proposal:
        return "-"
    parts = []
    if proposal.get("depth"):
        parts.append(f"depth: remove from {proposal['depth']['layers'][:6]}")
    if proposal.get("width"):
        width = proposal["width"]
        where = f"layers {width['layers'][:8]}" if width.get("layers") else "every layer"
        parts.append(f"width: {where}, MLP share {width.get('mlp_share', 1.0):.2f}")
    return "; ".join(parts)


def render_iteration(iteration: int, events: list[dict]) -> Panel:
    lines: list = []
    for event in events:
        kind = event["event"]
        if kind == "plan":
            status = event.get("status")
            fallback = f" -> fallback {event['fallback']}" if event.get("fallback") else ""
            lines.append(Text(f"planner {event.get('planner')} ({status}{fallback}, "
                              f"{event.get('duration_s', 0):.1f}s)", style="bold"))
            if event.get("fallback_reason"):
                lines.append(Text(f"  fallback because: {event['fallback_reason']}", style="yellow"))
            proposal = event.get("proposal") or {}
            lines.append(Text(f"  rationale: {proposal.get('rationale', '')}"))
            lines.append(Text(f"  proposal: {describe_proposal(proposal)}"))
            for attempt in event.get("attempts", []):
                if attempt.get("error"):
                    lines.append(Text(f"  attempt failed: {attempt['error']}", style="yellow"))
        elif kind == "candidate_built":
            lines.append(Text(f"  built {event['branch']}: {event.get('summary', '')} "
                              f"(sparsity {event.get('sparsity', 0):.1%})"))
        elif kind == "candidate_invalid":
            lines.append(Text(f"  {event['branch']} candidate invalid: {event['error']}", style="yellow"))
        elif kind == "candidate_scored":
            skipped = f"  (not probed: {event['probes_skipped']})" if event.get("probes_skipped") else ""
            lines.append(Text(f"  {event['branch']:<5} {format_metrics(event.get('metrics', {}))}{skipped}"))
        elif kind == "decision":
            style = "green" if event.get("accepted") else "red"
            verdict = f"accepted {event.get('branch')}" if event.get("accepted") else "rejected"
            lines.append(Text(f"  decision: {verdict}: {event.get('reason', '')}", style=style))
        elif kind == "heal":
            budget = f"{event.get('tokens', 0):,} tokens in {event.get('seconds', 0):.0f}s"
            kl = f"KL {event.get('kl_before', 0):.3g} -> {event.get('kl_after', 0):.3g}"
            lines.append(Text(f"  healed: {budget}, {kl}; {format_metrics(event.get('metrics', {}))}",
                              style="cyan"))
        elif kind == "reflection":
            by = f" ({event['status']})" if event.get("status") not in (None, "valid") else ""
            lines.append(Text(f"  reflection{by}: {event.get('lesson', '')}", style="magenta"))
        elif kind == "rollback":
            lines.append(Text(f"  rollback to step {event.get('to_step')}", style="red"))
    return Panel(Group(*lines), title=f"iteration {iteration}", title_align="left")


def render_timeline(records: list[dict], console: Console) -> None:
    grouped = by_iteration(records)
    for event in grouped.get(None, []):
        if event["event"] in ("start", "resume"):
            console.print(f"[bold]{event['event']}[/] {event['ts']}")
    for iteration in sorted(k for k in grouped if k is not None):
        console.print(render_iteration(iteration, grouped[iteration]))
    for event in grouped.get(None, []):
        if event["event"] == "finish":
            console.print(summary_table(event))


def summary_table(finish: dict) -> Table:
    from agent_prune.reporting.report import before_after_rows

    table = Table(title=f"finished: {finish.get('status')}")
    for column in ("", "dense", "pruned"):
        table.add_column(column)
    for row in before_after_rows(finish):
        table.add_row(*row)
    return table


def render_iteration_detail(iteration: int, events: list[dict], console: Console) -> None:
    """One iteration in full: every prompt message and raw reply, then the outcome."""
    for event in events:
        if event["event"] in ("plan", "reflection"):
            for number, attempt in enumerate(event.get("attempts", []), 1):
                console.rule(f"{event['event']} attempt {number}")
                for message in attempt.get("prompt", []):
                    console.print(f"[bold]{message.get('role')}:[/]")
                    console.print(message.get("content", ""), markup=False, highlight=False)
                if attempt.get("reasoning"):
                    console.print("[bold]reasoning:[/]")
                    console.print(attempt["reasoning"], markup=False, highlight=False)
                console.print("[bold]raw reply:[/]")
                console.print(str(attempt.get("raw_reply")), markup=False, highlight=False)
                if attempt.get("error"):
                    console.print(f"[yellow]error: {attempt['error']}[/]")
    console.print(render_iteration(iteration, events))
