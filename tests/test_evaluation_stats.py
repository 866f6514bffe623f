"""Standard errors, paired comparisons, gates and rank correlation: checked against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch

from agent_prune.evaluation.stats import (
    compare_paired,
    gate_paired,
    mean_estimate,
    paired_difference,
    perplexity_estimate,
    spearman_rho,
)


def test_mean_estimate_uses_sample_std_over_sqrt_n():
    values = [1.0, 2.0, 4.0, 7.0]
    mean = sum(values) / 4
    var = sum((v - mean) ** 2 for v in values) / 3
    estimate = mean_estimate(values)
    assert estimate.value == pytest.approx(mean)
    assert estimate.se == pytest.approx(math.sqrt(var / 4))
    assert estimate.n == 4


def test_perplexity_estimate_is_exp_mean_with_delta_method_error():
    nlls = [3.0, 3.2, 3.4]
    nll = mean_estimate(nlls)
    estimate = perplexity_estimate(nlls)
    assert estimate.value == pytest.approx(math.exp(3.2))
    assert estimate.se == pytest.approx(math.exp(3.2) * nll.se)


def test_paired_difference_removes_shared_item_spread():
    base = torch.linspace(0, 10, 50, dtype=torch.float64)  # large item-to-item spread
    shift = 0.05 + 0.01 * torch.sin(torch.arange(50, dtype=torch.float64))
    difference = paired_difference(base + shift, base)
    assert difference.value == pytest.approx(float(shift.mean()))
    assert difference.se < mean_estimate(base).se / 100
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0])


def test_compare_paired_verdicts_respect_direction_and_threshold():
    a = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95], dtype=torch.float64)
    better = compare_paired(a + 1.0, a, metric="acc", higher_is_better=True)
    assert better.verdict == "a" and better.z > 2.0
    lower_wins = compare_paired(a + 1.0, a, metric="nll", higher_is_better=False)
    assert lower_wins.verdict == "b"
    noisy = compare_paired(a, a.flip(0), metric="nll", higher_is_better=False)
    assert noisy.verdict == "tie" and abs(noisy.z) <= 2.0


def test_tie_break_prefers_smaller_model_then_incumbent():
    a = [1.0, 2.0, 3.0, 4.0]
    tie = compare_paired(a, a[::-1], metric="nll", higher_is_better=False)
    assert tie.verdict == "tie"
    assert tie.decide(size_a=100, size_b=90) == "b"
    assert tie.decide(size_a=90, size_b=100) == "a"
    assert tie.decide(size_a=100, size_b=100) == "a"
    real = compare_paired([2.0, 3.1, 4.0, 5.2], a, metric="nll", higher_is_better=False)
    assert real.verdict == "b" and real.decide(size_a=1, size_b=1000) == "b"


def test_gate_fails_only_when_loss_exceeds_allowance_beyond_noise():
    base = torch.linspace(3.0, 4.0, 20, dtype=torch.float64)
    noise = 0.002 * torch.cos(torch.arange(20, dtype=torch.float64))
    slightly_worse = base + math.log(1.05) + noise
    allowed = gate_paired(slightly_worse, base, metric="perplexity", higher_is_better=False,
                          max_loss=math.log(1.10))
    assert allowed.passed and allowed.loss.value == pytest.approx(math.log(1.05), abs=1e-3)
    too_much = gate_paired(base + math.log(1.3) + noise, base, metric="perplexity",
                           higher_is_better=False, max_loss=math.log(1.10))
    assert not too_much.passed
    accuracy_drop = gate_paired([0.0] * 10 + [1.0] * 10, [1.0] * 20, metric="acc", higher_is_better=True,
                                max_loss=0.01)
    assert accuracy_drop.loss.value == pytest.approx(0.5) and not accuracy_drop.passed


def test_spearman_matches_hand_values_with_ties():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> Pearson of those ranks
    rx = torch.tensor([1, 2.5, 2.5, 4]) - 2.5
    ry = torch.tensor([1, 2, 3, 4.0]) - 2.5
    expected = float((rx * ry).sum() / torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    assert spearman_rho([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(expected)
