"""Multiple-choice tasks (ARC-Easy/Challenge, CommonsenseQA, MMLU) scored by log-likelihood, as lm-eval does.

Every task uses the cloze prompt ``"Question: {question}\\nAnswer:"`` with continuations
``" " + choice`` (lm-eval's ARC format, applied to all tasks here so small models are scored on the
answer text, not on a letter). ``acc`` picks the choice with the highest summed log-likelihood;
``acc_norm`` divides each by the choice's length in UTF-8 bytes (lm-eval divides by ``len(choice)``
in characters, identical for ASCII) before picking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agent_prune.data.tasks import ChoiceItem
from agent_prune.evaluation.progress import Advance
from agent_prune.evaluation.scoring import ScoringRequest, continuation_logliks, encode_pair, pad_token_id

PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class ChoiceAccuracy:
    correct: torch.Tensor  # per item, float64 0/1
    correct_norm: torch.Tensor
    logliks: list[list[float]]


def requests_for(tokenizer, items: Sequence[ChoiceItem]) -> list[ScoringRequest]:
    requests = []
    for item in items:
        context = PROMPT.format(question=item.question)
        continuations = []
        for choice in item.choices:
            context_ids, continuation_ids = encode_pair(tokenizer, context, " " + choice)
            continuations.append(tuple(continuation_ids))
        requests.append(ScoringRequest(tuple(context_ids), tuple(continuations)))
    return requests


def choice_accuracy(
    model, tokenizer, items: Sequence[ChoiceItem], *, batch_size: int = 8, advance: Advance | None = None
) -> ChoiceAccuracy:
    """Per-item correctness by raw and by byte-length-normalised log-likelihood."""
    logliks = continuation_logliks(model, requests_for(tokenizer, items), pad_id=pad_token_id(tokenizer),
                                   batch_size=batch_size, advance=advance)
    correct, correct_norm = [], []
    for item, scores in zip(items, logliks):
        raw = torch.tensor(scores, dtype=torch.float64)
        lengths = torch.tensor([max(len(c.encode("utf-8")), 1) for c in item.choices], dtype=torch.float64)
        correct.append(float(int(raw.argmax()) == item.answer))
        correct_norm.append(float(int((raw / lengths).argmax()) == item.answer))
    return ChoiceAccuracy(torch.tensor(correct, dtype=torch.float64),
                          torch.tensor(correct_norm, dtype=torch.float64), logliks)
