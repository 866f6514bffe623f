"""Accept or reject a step: paired candidate choice and paired gates (pure functions on records).

Candidate choice (Mixture of Pruners): the candidates are compared on the *same* items by the
paired difference of the ``select_by`` signal (per-window NLL for perplexity, per-window KL to the
dense model for kl). A difference within ``z`` standard errors is a tie, broken in this order:
the FreebaseQA multiple-choice margin (paired), then fewer parameters, then the depth candidate
(removing layers speeds up prefill and decode more than thinning them; see bench/export_speed.py).

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
    """The kept candidate's rival and its lead in standard errors on the first paired comparison
    (the selection signal): positive when the kept one was better."""
    first = next((c for c in decision.get("comparisons", []) if "z" in c), None)
    if first is None or decision.get("branch") not in (first["a"], first["b"]):
        return {"rival": None, "rival_z": None}
    # z is of a - b in the metric's own units: a positive z favours b when lower is better
    b_lead = -first["z"] if METRICS[first["metric"]][1] else first["z"]
    kept_is_b = decision["branch"] == first["b"]
    return {"rival": first["a"] if kept_is_b else first["b"],
            "rival_z": round(b_lead if kept_is_b else -b_lead, 2)}


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
    results = []
    if gates.max_step_ppl_increase is not None:
        gate = gate_records(candidate, current, "perplexity",
                            max_loss=math.log1p(gates.max_step_ppl_increase), z_threshold=gates.z)
        results.append({"gate": "max_step_ppl_increase", "threshold": gates.max_step_ppl_increase,
                        "observed": math.expm1(gate.loss.value), **_gate_fields(gate)})
    if gates.max_total_ppl_increase is not None:
        gate = gate_records(candidate, dense, "perplexity",
                            max_loss=math.log1p(gates.max_total_ppl_increase), z_threshold=gates.z)
        results.append({"gate": "max_total_ppl_increase", "threshold": gates.max_total_ppl_increase,
                        "observed": math.expm1(gate.loss.value), **_gate_fields(gate)})
    if gates.min_probe_accuracy_ratio is not None:
        allowed = (1.0 - gates.min_probe_accuracy_ratio) * dense.mc_accuracy.value
        gate = gate_records(candidate, dense, "mc_accuracy", max_loss=allowed, z_threshold=gates.z)
        ratio = candidate.mc_accuracy.value / dense.mc_accuracy.value if dense.mc_accuracy.value else 1.0
        results.append({"gate": "min_probe_accuracy_ratio", "threshold": gates.min_probe_accuracy_ratio,
                        "observed": ratio, **_gate_fields(gate)})
    return results


def _gate_fields(gate) -> dict:
    return {"passed": gate.passed, "loss": gate.loss.value, "loss_se": gate.loss.se, "z": gate.z}


def rank_candidates(records: dict[str, SignalRecord], params: dict[str, int], select_by: str,
                    z: float) -> tuple[list[str], list[dict]]:
    """Branches best first, and the comparisons that ordered them (two candidates at most)."""
    branches = sorted(records, key=lambda b: (b != "depth", b))  # depth first: it wins full ties
    if len(branches) < 2:
        return branches, []
    a, b = branches[0], branches[1]
    comparisons = []
    for metric in (select_by, "mc_margin"):
        comparison = compare_records(records[a], records[b], metric, z_threshold=z)
        comparisons.append({"metric": metric, "a": a, "b": b, "verdict": comparison.verdict,
                            "difference": comparison.difference.value,
                            "se": comparison.difference.se, "z": comparison.z})
        if comparison.verdict != "tie":
            winner = a if comparison.verdict == "a" else b
            return [winner, b if winner == a else a], comparisons
    if params[b] < params[a]:
        return [b, a], [*comparisons, {"metric": "params", "verdict": "b"}]
    return [a, b], [*comparisons, {"metric": "params/depth", "verdict": "a"}]


def decide(records: dict[str, dict], params: dict[str, int], current: dict, dense: dict,
           gates: Gates, select_by: str = "perplexity") -> dict:
    """The decision for one iteration, as a JSON-ready dict with its reasons and figures."""
    if not records:
        return {"accepted": False, "branch": None, "reason": "no valid candidate could be built",
                "comparisons": [], "gates": {}}
    parsed = {b: SignalRecord.model_validate(r) for b, r in records.items()}
    current_rec, dense_rec = SignalRecord.model_validate(current), SignalRecord.model_validate(dense)
    order, comparisons = rank_candidates(parsed, params, select_by, gates.z)
    checks = {b: gate_results(parsed[b], current_rec, dense_rec, gates) for b in order}
    passing = [b for b in order if all(g["passed"] for g in checks[b])]
    if passing:
        branch = passing[0]
        why = "only candidate passing the gates"
        if branch == order[0] and comparisons:
            why = _why_first(comparisons)
        if len(order) == 1:
            why = "only candidate"
        reason = f"{branch} {why}; " + _gate_summary(checks[branch])
        return {"accepted": True, "branch": branch, "reason": reason, "comparisons": comparisons,
                "gates": checks, "metrics": headline(records[branch])}
    failed = [f"{b}: " + _gate_summary(checks[b], failed_only=True) for b in order]
    return {"accepted": False, "branch": order[0], "reason": "gates crossed - " + "; ".join(failed),
            "comparisons": comparisons, "gates": checks, "metrics": headline(records[order[0]])}


def _why_first(comparisons: list[dict]) -> str:
    """Why the first-ranked candidate won: the comparison that decided, in words."""
    last = comparisons[-1]
    if last["metric"] == "params":
        return "tie on the signals, fewer parameters"
    if last["metric"] == "params/depth":
        return "tie on the signals and size, depth preferred (faster)"
    return f"better on paired {last['metric']} (z {last['z']:+.1f})"


def _gate_summary(checks: list[dict], failed_only: bool = False) -> str:
    shown = [c for c in checks if not (failed_only and c["passed"])]
    if not shown:
        return "no gates"
    return ", ".join(f"{c['gate']} {c['observed']:.3g} vs {c['threshold']:g} "
                     f"({'pass' if c['passed'] else 'FAIL'})" for c in shown)
