"""The decision names what decided it: a significant paired difference, or a tie broken by size."""

import math

from agent_prune.agent.decisions import decide, rival_margin
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
    # a winner that fails a gate hands the step to the candidate it beat last
    records["width-fluctuation"] = record(better, [-0.1] * 6)  # every probe question lost
    gates = Gates(max_step_ppl_increase=None, min_probe_accuracy_ratio=0.9)
    gated = decide(records, params, DENSE, DENSE, gates)
    assert gated["accepted"] and gated["branch"] == "width"
    assert "only candidate passing the gates" in gated["reason"]
