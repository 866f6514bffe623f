"""FreebaseQA knowledge probes: LLM-KICK exact match, gold-answer log-likelihood, multiple choice.

- Exact match follows LLM-KICK (arXiv 2310.01382): prompt ``"Please give answer to this question:
  {q}\\nThe answer is "``, greedy decoding, a hit when any alias (lowercased, spaces removed) occurs in
  the lowercased, space-removed output. The prompt's trailing space is left for the model to produce
  (generation starts after ``prompt.rstrip()``): BPE tokenizers attach a space to the following word,
  and a prompt ending in a bare space token makes SmolLM2 answer with digits (0 hits in the first 300
  questions, against a few with the space stripped). Too sparse on small models to steer by; reported only.
- Gold log-likelihood: teacher-forced sum of log-probs of ``" " + alias`` after ``prompt.rstrip()``
  (BPE tokenizers attach the space to the word), best alias. Rises when layers are removed (a flatter
  distribution lifts rare answers), so it is reported, never gated on.
- Multiple choice: the gold answer (best alias) against ``k`` distractors, other questions' answers
  of the same kind (a year against years; otherwise names with the same number of words), drawn with
  a fixed seed. Accuracy and the margin (gold LL minus the best distractor's LL) track damage; the
  margin is continuous, so it resolves small differences that accuracy cannot.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agent_prune.data.tasks import QAItem
from agent_prune.evaluation.progress import Advance
from agent_prune.evaluation.scoring import (
    ScoringRequest,
    continuation_logliks,
    encode_pair,
    greedy_generate,
    pad_token_id,
)

PROMPT = "Please give answer to this question: {question}\nThe answer is "
MAX_NEW_TOKENS = 16


def prompt_for(question: str) -> str:
    return PROMPT.format(question=question)


def normalise(text: str) -> str:
    return "".join(text.lower().split())


def is_hit(output: str, aliases: Sequence[str]) -> bool:
    produced = normalise(output)
    return any(normalise(alias) and normalise(alias) in produced for alias in aliases)


def exact_match(
    model, tokenizer, items: Sequence[QAItem], *, batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS, advance: Advance | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Per-question hits (float 0/1) of the LLM-KICK probe, and the generated texts."""
    prompts = [tokenizer(prompt_for(item.question).rstrip(), add_special_tokens=True).input_ids
               for item in items]
    generated = greedy_generate(model, prompts, pad_id=pad_token_id(tokenizer),
                                eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, advance=advance)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    hits = torch.tensor([float(is_hit(t, item.answers)) for t, item in zip(texts, items)],
                        dtype=torch.float64)
    return hits, texts


def answer_kind(answer: str) -> str:
    """A coarse kind, so distractors look like the gold answer: years/numbers, or names by word count."""
    if answer.replace(",", "").replace(".", "").strip().isdigit():
        return "number"
    return f"words:{min(len(answer.split()), 3)}"


def draw_distractors(items: Sequence[QAItem], pool: Sequence[QAItem], k: int, seed: int = 0
                     ) -> list[tuple[str, ...]]:
    """``k`` distractors per item: answers (first alias) of other pool questions, same kind if possible.

    Each item's draw is seeded by ``(seed, item.id)``, so it does not depend on which other items
    are evaluated. Distractors never equal one of the item's aliases and are distinct.
    """
    candidates = list(dict.fromkeys(q.answers[0] for q in pool if q.answers))
    by_kind: dict[str, list[str]] = {}
    for answer in candidates:
        by_kind.setdefault(answer_kind(answer), []).append(answer)
    drawn = []
    for item in items:
        rng = random.Random(f"{seed}:{item.id}")
        aliases = {normalise(a) for a in item.answers}
        same = [a for a in by_kind.get(answer_kind(item.answers[0]), []) if normalise(a) not in aliases]
        same_set = set(same)
        other = [a for a in candidates if normalise(a) not in aliases and a not in same_set]
        picks = rng.sample(same, min(k, len(same)))
        if len(picks) < k:
            picks += rng.sample(other, k - len(picks))
        drawn.append(tuple(picks))
    return drawn


@dataclass(frozen=True)
class ChoiceScores:
    """Per-question vectors of the FreebaseQA multiple-choice probe (float64, one entry per question)."""

    gold_loglik: torch.Tensor  # best alias, nats
    best_distractor_loglik: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.gold_loglik - self.best_distractor_loglik

    @property
    def correct(self) -> torch.Tensor:
        return (self.margin > 0).double()


def choice_requests(tokenizer, items: Sequence[QAItem], distractors: Sequence[Sequence[str]]
                    ) -> list[ScoringRequest]:
    """Context ``prompt.rstrip()``, continuations ``" " + answer``: aliases first, then distractors."""
    requests = []
    for item, wrong in zip(items, distractors):
        context = prompt_for(item.question).rstrip()
        continuations = []
        for answer in (*item.answers, *wrong):
            context_ids, continuation_ids = encode_pair(tokenizer, context, " " + answer)
            continuations.append(tuple(continuation_ids))
        requests.append(ScoringRequest(tuple(context_ids), tuple(continuations)))
    return requests


def choice_scores(
    model, tokenizer, items: Sequence[QAItem], distractors: Sequence[Sequence[str]], *,
    batch_size: int = 8, advance: Advance | None = None, requests: Sequence[ScoringRequest] | None = None,
) -> ChoiceScores:
    """Gold (best alias) and best-distractor log-likelihoods per question.

    ``requests`` may be passed pre-tokenised (from :func:`choice_requests`) when the same items are
    scored for many models.
    """
    if requests is None:
        requests = choice_requests(tokenizer, items, distractors)
    logliks = continuation_logliks(model, requests, pad_id=pad_token_id(tokenizer),
                                   batch_size=batch_size, advance=advance)
    gold, best_wrong = [], []
    for item, scores in zip(items, logliks):
        aliases = len(item.answers)
        gold.append(max(scores[:aliases]))
        best_wrong.append(max(scores[aliases:]) if len(scores) > aliases else float("-inf"))
    return ChoiceScores(torch.tensor(gold, dtype=torch.float64),
                        torch.tensor(best_wrong, dtype=torch.float64))
