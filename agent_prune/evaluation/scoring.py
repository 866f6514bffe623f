"""Batched log-likelihood scoring and greedy generation with left padding (shared by all probes).

Scoring a context with several continuations runs the context once: its KV cache is copied to one
row per continuation and only the continuation tokens are run again. That is exact (the same
computation as scoring ``context + continuation`` in one pass, up to float rounding) and saves the
repeated context, which dominates short-answer probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agent_prune.evaluation.progress import Advance
from agent_prune.models.streaming import batch_slices

# Positions whose [positions, vocab] temporaries (log-softmax, KL terms) are taken together: 25 MB at
# 49k instead of a second [seqlen, vocab] copy of the logits (100 MB at 512 tokens, at the loop's
# scoring peak, issue 16). Each position's value is the same operation either way, so the same bits.
LOGIT_POSITIONS = 128


@dataclass(frozen=True)
class ScoringRequest:
    """One context (token ids) and the continuations to score after it."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split as lm-eval does (encode the whole, cut at the context).

    Encoding the whole string keeps the tokenizer's own treatment of the boundary (a leading space
    belongs to the continuation's first word); if the context's tokens are not a prefix of the whole,
    the continuation is encoded on its own instead.
    """
    context_ids = tokenizer(context, add_special_tokens=True).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=True).input_ids
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids):]
    return context_ids, tokenizer(continuation, add_special_tokens=False).input_ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Ids, attention mask and position ids (counting real tokens only) for left-padded rows."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.inference_mode()
def continuation_logliks(
    model, requests: Sequence[ScoringRequest], *, pad_id: int, batch_size: int = 8,
    advance: Advance | None = None,
) -> list[list[float]]:
    """Sum of log-probabilities of each continuation given its context (teacher forcing), in nats.

    Requests are sorted by context length so batches pad little; results come back in input order.
    """
    results: list[list[float]] = [[] for _ in requests]
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].context))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        scores = _score_batch(model, [requests[i] for i in chunk], pad_id)
        for index, row_scores in zip(chunk, scores):
            results[index] = row_scores
        if advance is not None:
            advance(len(chunk))
    return results


def _score_batch(model, requests: Sequence[ScoringRequest], pad_id: int) -> list[list[float]]:
    device = model_device(model)
    for request in requests:
        if not request.context or any(len(c) == 0 for c in request.continuations):
            raise ValueError("contexts and continuations must hold at least one token")
    ids, mask, positions = left_pad([r.context for r in requests], pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    first_logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1)

    owner = [i for i, r in enumerate(requests) for _ in r.continuations]
    continuations = [c for r in requests for c in r.continuations]
    cont_ids, cont_mask = right_pad(continuations, pad_id)
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    owner_index = torch.tensor(owner, dtype=torch.long, device=device)
    totals = first_logprobs[owner_index].gather(1, cont_ids[:, :1]).squeeze(1)

    if cont_ids.shape[1] > 1:
        cache = out.cache
        cache.batch_select_indices(owner_index)
        # Only the tokens that predict a next continuation token are run; padding rows are masked.
        inputs = cont_ids[:, :-1]
        full_mask = torch.cat([mask[owner_index], cont_mask[:, :-1]], dim=1)
        lengths = mask.sum(1)[owner_index]
        cont_positions = lengths[:, None] + torch.arange(inputs.shape[1], device=device)[None, :]
        logits = model(input_ids=inputs, attention_mask=full_mask, position_ids=cont_positions,
                       cache=cache, use_cache=True).logits
        totals = totals + (token_logprobs(logits, cont_ids[:, 1:]) * cont_mask[:, 1:]).sum(1)

    scores: list[list[float]] = [[] for _ in requests]
    for row, request_index in enumerate(owner):
        scores[request_index].append(float(totals[row]))
    return scores


# Continuations whose log-softmax is taken together: a batch of 8 questions has about 35 of them, and
# their [rows, tokens, vocab] log-probabilities were a second copy of the logits (80 MB) at the
# scoring peak; each row's values are the same operation either way, so the same bits.
LOGPROB_ROWS = 8


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[rows, tokens]`` log-probabilities of ``targets`` under ``[rows, tokens, vocab]`` logits."""
    return torch.cat([F.log_softmax(logits[rows].float(), dim=-1).gather(2, targets[rows, :, None]).squeeze(2)
                      for rows in batch_slices(logits.shape[0], LOGPROB_ROWS)])


@torch.inference_mode()
def greedy_generate(
    model, prompts: Sequence[Sequence[int]], *, pad_id: int, eos_id: int | None,
    max_new_tokens: int = 16, batch_size: int = 16, advance: Advance | None = None,
) -> list[list[int]]:
    """Greedy continuations (new tokens only, cut at EOS) of each prompt, batched with left padding."""
    results: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask, _ = left_pad([prompts[i] for i in chunk], pad_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id,
                             temperature=None, top_p=None, top_k=None)
        for index, row in zip(chunk, out[:, ids.shape[1]:].tolist()):
            results[index] = row[: row.index(eos_id)] if eos_id in row else row
        if advance is not None:
            advance(len(chunk))
    return results
