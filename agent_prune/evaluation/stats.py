"""Estimates with standard errors, and paired comparisons that call a difference inside the noise a tie.

Every figure the evaluation reports is an :class:`Estimate` (value, standard error, item count). Means
use the sample standard deviation (``ddof=1``) over items, as lm-eval does for its ``_stderr`` fields;
perplexity is ``exp`` of the mean per-window NLL, its error comes from the delta method
(``se(ppl) = ppl * se(mean NLL)``), valid because every window has the same number of tokens.

Two candidates are compared on the *same* items through the per-item difference (a paired test), which
removes the item-to-item spread that both share: differences much smaller than either unpaired error bar
are then still resolvable. A difference with ``|z| <= z_threshold`` is a tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

Verdict = Literal["a", "b", "tie"]


class Estimate(BaseModel):
    """A figure with its standard error over ``n`` items."""

    model_config = ConfigDict(frozen=True)

    value: float
    se: float
    n: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        return self.value - z * self.se, self.value + z * self.se

    def __str__(self) -> str:
        return f"{self.value:.4g} ± {self.se:.2g}"


def as_vector(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    vector = torch.as_tensor(values, dtype=torch.float64).flatten()
    if vector.numel() == 0:
        raise ValueError("an estimate needs at least one item")
    return vector


def mean_estimate(values: Sequence[float] | torch.Tensor) -> Estimate:
    """Mean and its standard error (sample std with ddof=1 over sqrt(n)); se is 0 for one item."""
    vector = as_vector(values)
    n = vector.numel()
    se = float(vector.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return Estimate(value=float(vector.mean()), se=se, n=n)


def perplexity_estimate(window_nlls: Sequence[float] | torch.Tensor) -> Estimate:
    """Perplexity ``exp(mean NLL)`` over equal-length windows; delta-method error over windows."""
    nll = mean_estimate(window_nlls)
    value = math.exp(nll.value)
    return Estimate(value=value, se=value * nll.se, n=nll.n)


def paired_difference(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> Estimate:
    """Mean of ``a - b`` over the same items, with the paired standard error."""
    va, vb = as_vector(a), as_vector(b)
    if va.shape != vb.shape:
        raise ValueError(f"paired vectors differ in length ({va.numel()} vs {vb.numel()}): "
                         "compare candidates on the same items")
    return mean_estimate(va - vb)


class Comparison(BaseModel):
    """Outcome of a paired comparison of ``a`` and ``b`` on one metric.

    ``difference`` is ``mean(a - b)`` in the metric's per-item units (for perplexity: mean per-window
    NLL, so ``exp(difference.value)`` is the perplexity ratio a/b). ``verdict`` names the better one,
    or ``tie`` when ``|z| <= z_threshold``.
    """

    metric: str
    higher_is_better: bool
    difference: Estimate
    z: float
    z_threshold: float
    verdict: Verdict

    def decide(self, size_a: float, size_b: float) -> Literal["a", "b"]:
        """The documented tie-break: on a tie the smaller model wins; equal sizes keep ``a``.

        ``a`` is meant to be the incumbent (the current model, or the earlier candidate), so a tie
        between equally sized models never causes churn.
        """
        if self.verdict != "tie":
            return self.verdict
        return "b" if size_b < size_a else "a"


def z_score(difference: Estimate) -> float:
    if difference.se > 0:
        return difference.value / difference.se
    # Identical per-item vectors (or one item): no noise to measure, any nonzero difference is real.
    return 0.0 if difference.value == 0 else math.copysign(math.inf, difference.value)


def compare_paired(
    a: Sequence[float] | torch.Tensor,
    b: Sequence[float] | torch.Tensor,
    *,
    metric: str,
    higher_is_better: bool,
    z_threshold: float = 2.0,
) -> Comparison:
    """Paired comparison of per-item values ``a`` and ``b``: verdict a, b or tie (``|z| <= z_threshold``)."""
    difference = paired_difference(a, b)
    z = z_score(difference)
    if abs(z) <= z_threshold:
        verdict: Verdict = "tie"
    else:
        a_larger = z > 0
        verdict = "a" if a_larger == higher_is_better else "b"
    return Comparison(metric=metric, higher_is_better=higher_is_better, difference=difference,
                      z=z, z_threshold=z_threshold, verdict=verdict)


class Gate(BaseModel):
    """Whether ``a`` lost at most ``max_loss`` against ``b``, judged with the same paired machinery.

    ``loss`` is how much worse ``a`` is than ``b`` per item (positive = worse; for perplexity in
    nats per token, so ``max_loss = log(1.10)`` allows a 10% rise). The gate fails only when the loss
    exceeds ``max_loss`` by more than ``z_threshold`` standard errors: noise alone never fails it.
    """

    metric: str
    loss: Estimate
    max_loss: float
    z: float
    z_threshold: float
    passed: bool


def gate_paired(
    a: Sequence[float] | torch.Tensor,
    b: Sequence[float] | torch.Tensor,
    *,
    metric: str,
    higher_is_better: bool,
    max_loss: float,
    z_threshold: float = 2.0,
) -> Gate:
    """Paired gate: pass unless ``a`` is worse than ``b`` by significantly more than ``max_loss``."""
    difference = paired_difference(a, b)
    sign = -1.0 if higher_is_better else 1.0
    loss = Estimate(value=sign * difference.value, se=difference.se, n=difference.n)
    z = z_score(Estimate(value=loss.value - max_loss, se=loss.se, n=loss.n))
    return Gate(metric=metric, loss=loss, max_loss=max_loss, z=z, z_threshold=z_threshold,
                passed=z <= z_threshold)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks; ties share their mean rank)."""
    rx, ry = average_ranks(as_vector(x)), average_ranks(as_vector(y))
    if rx.shape != ry.shape or rx.numel() < 2:
        raise ValueError("spearman_rho needs two vectors of the same length, at least 2 items")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else 0.0


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks; tied values get the mean of the ranks they span."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    sorted_values = values[order]
    start = 0
    n = values.numel()
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks
