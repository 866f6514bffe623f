"""The decision names what decided it: a significant paired difference, or a tie broken by size."""

import math

from agent_prune.agent.decisions import decide, rival_margin, ruled_out
from agent_prune.agent.options import Gates
from agent_prune.evaluation.loop import SignalRecord
from agent_prune.evaluation.stats import mean_estimate, perplexity_estimate


def record(nll: list[float], margin: list[float]) -> dict:
    correct = [float(m > 0) for m in margin]
    return SignalRecord(
        perplexity=perplexity_estimate(nll), mc_accuracy=mean_estimate(correct),
        mc_margin=mean_estimate(margin), window_nll=nll, question_margin=margin,
        question_correct=correct, items_key="k", seconds=0.0,
    ).model_dump()


DENSE = record([3.0, 3.1, 2.9, 3.0, 3.2, 2.8], [0.5, -0.2, 0.3, 0.1, -0.4, 0.6])
NOISY = [3.3, 3.45, 3.15, 3.3, 3.55, 3.05]


def test_a_significant_difference_is_named_with_its_z():
    worse = [x + 0.3 + 0.01 * i for i, x in enumerate(NOISY)]
    records = {"depth": record(worse, [0.1] * 6), "width": record(NOISY, [0.1] * 6)}
    result = decide(records, {"depth": 100, "width": 100}, DENSE, DENSE, Gates(max_step_ppl_increase=None))
    assert result["accepted"] and result["branch"] == "width"
    assert "better on paired perplexity" in result["reason"]


def test_a_full_tie_says_so_and_goes_to_the_smaller_model_then_to_depth():
    same = {"depth": record(NOISY, [0.1] * 6), "width": record(NOISY, [0.1] * 6)}
    gates = Gates(max_step_ppl_increase=math.inf)
    smaller = decide(same, {"depth": 100, "width": 90}, DENSE, DENSE, gates)
    assert smaller["branch"] == "width" and "tie on the signals, fewer parameters" in smaller["reason"]
    equal = decide(same, {"depth": 100, "width": 100}, DENSE, DENSE, gates)
    assert equal["branch"] == "depth" and "depth preferred" in equal["reason"]


def test_the_history_keeps_the_rival_and_the_kept_candidates_lead_in_standard_errors():
    worse = [x + 0.3 + 0.01 * i for i, x in enumerate(NOISY)]
    gates = Gates(max_step_ppl_increase=None)
    width_won = decide({"depth": record(worse, [0.1] * 6), "width": record(NOISY, [0.1] * 6)},
                       {"depth": 100, "width": 100}, DENSE, DENSE, gates)
    lead = rival_margin(width_won)
    assert lead["rival"] == "depth" and lead["rival_z"] > 10  # +0.3 nats with SE under 0.01
    depth_won = decide({"depth": record(NOISY, [0.1] * 6), "width": record(worse, [0.1] * 6)},
                       {"depth": 100, "width": 100}, DENSE, DENSE, gates)
    assert rival_margin(depth_won) == {"rival": "width", "rival_z": lead["rival_z"],
                                       "leads": {"width": lead["rival_z"]}}
    # on a higher-is-better signal the sign follows the kept candidate too
    surer = [0.2 + 0.01 * i for i in range(6)]
    by_margin = decide({"depth": record(NOISY, [0.1] * 6), "width": record(NOISY, surer)},
                       {"depth": 100, "width": 100}, DENSE, DENSE, gates, select_by="mc_margin")
    assert by_margin["branch"] == "width" and rival_margin(by_margin)["rival_z"] > 2
    alone = decide({"width": record(NOISY, [0.1] * 6)}, {"width": 100}, DENSE, DENSE, gates)
    assert rival_margin(alone) == {"rival": None, "rival_z": None, "leads": {}}


def test_three_candidates_meet_in_a_knockout_and_the_history_keeps_the_lead_over_each():
    # depth far behind, the second width candidate a little ahead of the first on paired NLL
    worse = [x + 0.3 + 0.01 * i for i, x in enumerate(NOISY)]
    better = [x - 0.05 - 0.002 * i for i, x in enumerate(NOISY)]
    records = {"width-fluctuation": record(better, [0.1] * 6), "depth": record(worse, [0.1] * 6),
               "width": record(NOISY, [0.1] * 6)}
    params = dict.fromkeys(records, 100)
    result = decide(records, params, DENSE, DENSE, Gates(max_step_ppl_increase=None))
    assert result["accepted"] and result["branch"] == "width-fluctuation"
    assert [(c["a"], c["b"]) for c in result["comparisons"] if c["metric"] == "perplexity"] == [
        ("depth", "width"), ("width", "width-fluctuation")]
    margin = rival_margin(result)
    assert margin["rival"] == "width" and 2 < margin["rival_z"] < margin["leads"]["depth"]
    assert set(margin["leads"]) == {"depth", "width"}
    # a candidate that fails a gate leaves the knockout: the others meet without it
    records["width-fluctuation"] = record(better, [-0.1] * 6)  # every probe question lost
    gates = Gates(max_step_ppl_increase=None, min_probe_accuracy_ratio=0.9)
    gated = decide(records, params, DENSE, DENSE, gates)
    assert gated["accepted"] and gated["branch"] == "width"
    assert gated["reason"].startswith("width better on paired perplexity")
    assert [(c["a"], c["b"]) for c in gated["comparisons"]] == [("depth", "width")]


def unprobed(nll: list[float], why: str = "ruled out") -> dict:
    """A record whose probes were skipped (``LoopEvaluator.score``'s ``skip_probes``)."""
    return SignalRecord(perplexity=perplexity_estimate(nll), window_nll=nll, probes_skipped=why,
                        items_key="k", seconds=0.0).model_dump()


def test_a_candidate_its_perplexity_rules_out_needs_no_probes_and_stays_out_of_the_choice():
    far = [x + 0.9 + 0.01 * i for i, x in enumerate(NOISY)]  # exp(0.9) - 1: +146% on the current model
    gates = Gates(max_step_ppl_increase=0.5, min_probe_accuracy_ratio=0.9)
    current = SignalRecord.model_validate(record(NOISY, [0.1] * 6))
    reason = ruled_out(SignalRecord.model_validate(unprobed(far)), current, current, gates)
    assert reason is not None and reason.startswith("max_step_ppl_increase") and "FAIL" in reason
    assert ruled_out(SignalRecord.model_validate(unprobed(NOISY)), current, current, gates) is None
    # the ruled-out depth candidate, unprobed, leaves the two width candidates to decide on their own
    better = [x - 0.002 * i for i, x in enumerate(NOISY)]
    records = {"depth": unprobed(far), "width": record(NOISY, [0.1] * 6),
               "width-fluctuation": record(better, [0.3 + 0.01 * i for i in range(6)])}
    result = decide(records, dict.fromkeys(records, 100), record(NOISY, [0.1] * 6), DENSE, gates)
    assert result["accepted"] and result["branch"] == "width-fluctuation"
    assert [(c["a"], c["b"]) for c in result["comparisons"]] == [("width", "width-fluctuation")]
    assert [g["gate"] for g in result["gates"]["depth"]] == ["max_step_ppl_increase", "probed"]
    assert result["leads"]["depth"] > 10  # still measured against it on the selection signal
    # every candidate ruled out: a rollback naming the least bad, compared on perplexity alone
    worst = [x + 0.2 for x in far]
    rejected = decide({"depth": unprobed(worst), "width": unprobed(far)}, {"depth": 100, "width": 100},
                      record(NOISY, [0.1] * 6), DENSE, gates)
    assert not rejected["accepted"] and rejected["branch"] == "width"
    assert [c["metric"] for c in rejected["comparisons"]] == ["perplexity"]


def test_a_record_scored_without_probes_is_never_accepted_even_under_gates_it_now_passes():
    # e.g. signals.json read again after the run's gates were loosened: its perplexity passes now,
    # but nothing measured its FreebaseQA probes, so it cannot be kept (nor win on their margin)
    loose = Gates(max_step_ppl_increase=None)
    current = record(NOISY, [0.1] * 6)
    alone = decide({"width": unprobed(NOISY, why="max_step_ppl_increase 0.6 vs 0.5 (FAIL)")}, {"width": 100},
                   current, DENSE, loose)
    assert not alone["accepted"]
    assert alone["reason"] == "gates crossed - width: not probed (FAIL)"
    why = "max_step_ppl_increase 0.6 vs 0.5 (FAIL)"
    assert alone["gates"]["width"] == [{"gate": "probed", "observed": why, "passed": False}]
    # beside a probed candidate that is worse on perplexity, the probed one is kept
    worse = [x + 0.01 for x in NOISY]
    pair = decide({"depth": record(worse, [0.1] * 6), "width": unprobed(NOISY)}, {"depth": 100, "width": 100},
                  current, DENSE, loose)
    assert pair["accepted"] and pair["branch"] == "depth"
    assert pair["comparisons"] == [] and "failing_comparisons" not in pair  # nothing to compare with
    # the candidates the gates fail are ranked apart: their matches never read as the winner's
    records = {"depth": record(worse, [0.1] * 6), "width": unprobed(NOISY),
               "width-fluctuation": unprobed(NOISY)}
    three = decide(records, dict.fromkeys(records, 100), current, DENSE, loose)
    assert three["branch"] == "depth" and three["comparisons"] == []
    assert [(c["metric"], c["a"], c["b"]) for c in three["failing_comparisons"]] == [
        ("perplexity", "width", "width-fluctuation"), ("params/depth", "width", "width-fluctuation")]
