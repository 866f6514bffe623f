"""Accept or reject a step: paired candidate choice and paired gates (pure functions on records).

Candidate choice (Mixture of Pruners): the candidates are compared on the *same* items by the
paired difference of the ``select_by`` signal (per-window NLL for perplexity, per-window KL to the
dense model for kl). A difference within ``z`` standard errors is a tie, broken in this order:
the FreebaseQA multiple-choice margin (paired), then fewer parameters, then the depth candidate
(removing layers speeds up prefill and decode more than thinning them; see bench/export_speed.py).
More than two candidates (width candidates sized by different scores) meet in a knockout: the leader
against each next one, by the same rule.

Gates: the chosen candidate must not be worse than the current model by more than
``max_step_ppl_increase``, nor worse than the dense model by more than ``max_total_ppl_increase``,
and its probe accuracy must stay above ``min_probe_accuracy_ratio`` x dense. Each gate fails only
when the loss exceeds its threshold by more than ``z`` standard errors, so noise alone never rolls a
step back. A candidate that fails a gate is never accepted; if the other passes, it is taken.
"""

from __future__ import annotations

import math

from agent_prune.agent.options import Gates
from agent_prune.evaluation.loop import METRICS, SignalRecord, compare_records, gate_records

HEADLINE = ("perplexity", "mc_accuracy", "mc_margin", "kl")


def headline(record: dict) -> dict:
    return {name: record[name] for name in HEADLINE if record.get(name) is not None}


def history_metrics(candidate: dict) -> dict:
    metrics = candidate.get("metrics", {})
    return {"perplexity": metrics["perplexity"]["value"],
            "probe_accuracy": metrics.get("mc_accuracy", {}).get("value")}


def rival_margin(decision: dict) -> dict:
    """The kept candidate's closest rival and its lead over it in standard errors on the paired
    selection signal (positive when the kept one was better), and its lead over every rival."""
    ahead = decision.get("leads") or {}
    if not ahead:
        return {"rival": None, "rival_z": None, "leads": {}}
    rival = min(ahead, key=lambda b: (ahead[b], b))
    return {"rival": rival, "rival_z": ahead[rival], "leads": dict(ahead)}


def describe_actions(actions: list[dict]) -> str:
    removed = [layer for a in actions if a["kind"] == "remove_layers" for layer in a["layers"]]
    width = [a for a in actions if a["kind"] == "prune_width"]
    parts = []
    if removed:
        parts.append(f"remove layers {removed}")
    if width:
        channels = sum(int(a.get("mlp_channels", 0)) for a in width)
        groups = sum(int(a.get("kv_groups", 0)) for a in width)
        text = f"-{channels} MLP channels over {len(width)} layers"
        if groups:
            text += f", -{groups} KV groups"
        parts.append(text)
    return "; ".join(parts) or "no change"


def gate_results(candidate: SignalRecord, current: SignalRecord, dense: SignalRecord,
                 gates: Gates) -> list[dict]:
    """Every gate's result. A candidate scored without probes fails a ``probed`` gate as well: it was
    ruled out by its perplexity when scored (:func:`ruled_out`), and must stay out even where
    ``gates`` now differ (a record read again under other options)."""
    results = perplexity_gates(candidate, current, dense, gates)
    if candidate.probes_skipped is not None:
        results.append({"gate": "probed", "observed": candidate.probes_skipped, "passed": False})
    elif gates.min_probe_accuracy_ratio is not None:
        allowed = (1.0 - gates.min_probe_accuracy_ratio) * dense.mc_accuracy.value
        gate = gate_records(candidate, dense, "mc_accuracy", max_loss=allowed, z_threshold=gates.z)
        ratio = candidate.mc_accuracy.value / dense.mc_accuracy.value if dense.mc_accuracy.value else 1.0
        results.append({"gate": "min_probe_accuracy_ratio", "threshold": gates.min_probe_accuracy_ratio,
                        "observed": ratio, **_gate_fields(gate)})
    return results


def perplexity_gates(candidate: SignalRecord, current: SignalRecord, dense: SignalRecord,
                     gates: Gates) -> list[dict]:
    """The gates on the candidate's validation perplexity against the current and the dense model."""
    results = []
    for name, reference in (("max_step_ppl_increase", current), ("max_total_ppl_increase", dense)):
        threshold = getattr(gates, name)
        if threshold is None:
            continue
        gate = gate_records(candidate, reference, "perplexity", max_loss=math.log1p(threshold),
                            z_threshold=gates.z)
        results.append({"gate": name, "threshold": threshold, "observed": math.expm1(gate.loss.value),
                        **_gate_fields(gate)})
    return results


def ruled_out(candidate: SignalRecord, current: SignalRecord, dense: SignalRecord,
              gates: Gates) -> str | None:
    """Why ``candidate`` can never be accepted on its perplexity alone (the perplexity gates it fails),
    or None: such a candidate needs no probes (``LoopEvaluator.score``'s ``skip_probes``)."""
    failed = [g for g in perplexity_gates(candidate, current, dense, gates) if not g["passed"]]
    return _gate_summary(failed) if failed else None


def _gate_fields(gate) -> dict:
    return {"passed": gate.passed, "loss": gate.loss.value, "loss_se": gate.loss.se, "z": gate.z}


def rank_candidates(records: dict[str, SignalRecord], params: dict[str, int], select_by: str,
                    z: float) -> tuple[list[str], list[dict]]:
    """Branches best first, and the comparisons that ordered them: a knockout in which the leader
    meets each next candidate (depth first, so that it wins full ties; then ``width`` and the other
    width candidates by name); the order below the winner is the reverse order of elimination.
    :func:`decide` ranks the candidates that pass the gates apart from those that fail them."""
    if not records:
        return [], []
    branches = sorted(records, key=lambda b: (b != "depth", b != "width", b))
    best, beaten, comparisons = branches[0], [], []
    for challenger in branches[1:]:
        (best, loser), match = _match(records, params, best, challenger, select_by, z)
        comparisons += match
        beaten.insert(0, loser)
    return [best, *beaten], comparisons


def _match(records: dict[str, SignalRecord], params: dict[str, int], a: str, b: str, select_by: str,
           z: float) -> tuple[tuple[str, str], list[dict]]:
    """(winner, loser) of two candidates and the comparisons that settled it: the paired selection
    signal, then the FreebaseQA margin, then fewer parameters, then ``a`` (depth, or the width
    candidate sized as the planner proposed)."""
    comparisons = []
    for metric in (select_by, "mc_margin"):
        if metric == "mc_margin" and None in (records[a].question_margin, records[b].question_margin):
            continue  # a candidate not probed (ruled out by its perplexity): no margin to compare
        comparison = compare_records(records[a], records[b], metric, z_threshold=z)
        comparisons.append({"metric": metric, "a": a, "b": b, "verdict": comparison.verdict,
                            "difference": comparison.difference.value,
                            "se": comparison.difference.se, "z": comparison.z})
        if comparison.verdict != "tie":
            return ((a, b) if comparison.verdict == "a" else (b, a)), comparisons
    if params[b] < params[a]:
        return (b, a), [*comparisons, {"metric": "params", "a": a, "b": b, "verdict": "b"}]
    return (a, b), [*comparisons, {"metric": "params/depth", "a": a, "b": b, "verdict": "a"}]


def leads(records: dict[str, SignalRecord], kept: str, select_by: str, z: float) -> dict[str, float]:
    """How many standard errors ``kept`` is ahead of each other candidate on the paired selection
    signal (negative: behind it, kept by the gates or a tie-break)."""
    higher_is_better = METRICS[select_by][1]
    out = {}
    for other in sorted(set(records) - {kept}):
        comparison = compare_records(records[kept], records[other], select_by, z_threshold=z)
        out[other] = round(comparison.z if higher_is_better else -comparison.z, 2)
    return out


def decide(records: dict[str, dict], params: dict[str, int], current: dict, dense: dict,
           gates: Gates, select_by: str = "perplexity") -> dict:
    """The decision for one iteration, as a JSON-ready dict with its reasons and figures."""
    if not records:
        return {"accepted": False, "branch": None, "reason": "no valid candidate could be built",
                "comparisons": [], "gates": {}}
    parsed = {b: SignalRecord.model_validate(r) for b, r in records.items()}
    current_rec, dense_rec = SignalRecord.model_validate(current), SignalRecord.model_validate(dense)
    checks = {b: gate_results(parsed[b], current_rec, dense_rec, gates) for b in parsed}
    passing = [b for b in parsed if all(g["passed"] for g in checks[b])]
    # A candidate the gates fail is never accepted, so it takes no part in choosing among the others
    # (whether its probes were run or not); the failures are ranked apart, for the record (an
    # accepted decision's ``failing_comparisons``).
    order, comparisons = rank_candidates({b: parsed[b] for b in passing}, params, select_by, gates.z)
    failing_order, failing_comparisons = rank_candidates(
        {b: r for b, r in parsed.items() if b not in passing}, params, select_by, gates.z)
    if passing:
        branch = order[0]
        why = _why_first(comparisons) if comparisons else "only candidate passing the gates"
        if len(parsed) == 1:
            why = "only candidate"
        reason = f"{branch} {why}; " + _gate_summary(checks[branch])
        return {"accepted": True, "branch": branch, "reason": reason, "comparisons": comparisons,
                **({"failing_comparisons": failing_comparisons} if failing_comparisons else {}),
                "leads": leads(parsed, branch, select_by, gates.z), "gates": checks,
                "metrics": headline(records[branch])}
    failed = [f"{b}: " + _gate_summary(checks[b], failed_only=True) for b in failing_order]
    branch = failing_order[0]
    return {"accepted": False, "branch": branch, "reason": "gates crossed - " + "; ".join(failed),
            "comparisons": failing_comparisons, "gates": checks, "metrics": headline(records[branch])}


def _why_first(comparisons: list[dict]) -> str:
    """Why the first-ranked candidate won: the comparison that decided, in words."""
    last = comparisons[-1]
    if last["metric"] == "params":
        return "tie on the signals, fewer parameters"
    if last["metric"] == "params/depth":
        if last["a"] == "depth":
            return "tie on the signals and size, depth preferred (faster)"
        return "tie on the signals and size, the planner's own sizing preferred"
    return f"better on paired {last['metric']} (z {last['z']:+.1f})"


def _gate_summary(checks: list[dict], failed_only: bool = False) -> str:
    shown = [c for c in checks if not (failed_only and c["passed"])]
    if not shown:
        return "no gates"
    return ", ".join(f"{c['gate']} {c['observed']:.3g} vs {c['threshold']:g} "
                     f"({'pass' if c['passed'] else 'FAIL'})" if "threshold" in c
                     else f"not {c['gate']} (FAIL)" for c in shown)  # why: the record's probes_skipped
