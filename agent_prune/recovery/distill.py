"""Distillation losses: the student's next-token distribution pulled toward the dense teacher's.

Logit distillation (Hinton et al., arXiv 1503.02531) is how Minitron heals pruned models (Muralidharan
et al., arXiv 2407.14679): forward KL(teacher || student) per token, averaged over tokens. A teacher
too large to run beside the student can be represented by its top-k log-probabilities plus one
"tail" bucket holding the remaining mass; the KL of those k+1 coarse outcomes is exact for them and
a lower bound of the full KL (Sparse/top-k KD, as in Minitron's and MiniLLM's cached-logit setups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class TopK:
    """The teacher's top-k log-probabilities and their token ids, shape (..., k)."""

    logprobs: torch.Tensor
    indices: torch.Tensor


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/T) || softmax(student/T)), times T^2 (Hinton's scaling)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(dim=-1)
    return per_token.mean() * temperature**2


def top_k(teacher_logits: torch.Tensor, k: int) -> TopK:
    logprobs = F.log_softmax(teacher_logits.float(), dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return TopK(values, indices)


def kl_top_k(student_logits: torch.Tensor, teacher: TopK) -> torch.Tensor:
    """Mean over tokens of the KL between the teacher's and student's (top-k + tail) distributions."""
    s_all = F.log_softmax(student_logits.float(), dim=-1)
    s = s_all.gather(-1, teacher.indices)
    t = teacher.logprobs
    p = t.exp()
    head = (p * (t - s)).sum(dim=-1)
    t_tail = _log1m(torch.logsumexp(t, dim=-1))
    s_tail = _log1m(torch.logsumexp(s, dim=-1))
    tail = t_tail.exp() * (t_tail - s_tail)
    return (head + tail).mean()


def _log1m(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_mass)), clamped so a mass of (numerically) one stays finite."""
    return torch.log1p(-log_mass.exp().clamp(max=1 - 1e-6))
