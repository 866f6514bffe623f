"""Perplexity by the Wanda/SparseGPT protocol, kept per window so it can carry an error bar.

The protocol (Wanda, arXiv 2306.11695; SparseGPT, arXiv 2301.00774): WikiText-2 raw, rows joined by
``"\\n\\n"``, tokenised once, cut into non-overlapping ``seqlen`` windows (remainder dropped); each
window is scored independently and perplexity is ``exp`` of the mean next-token NLL over all
predicted tokens (``seqlen - 1`` per window, as Hugging Face ``labels=`` computes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agent_prune.evaluation.progress import Advance
from agent_prune.evaluation.scoring import LOGIT_POSITIONS, model_device
from agent_prune.evaluation.stats import Estimate, perplexity_estimate
from agent_prune.models.streaming import batch_slices


@torch.inference_mode()
def window_nlls(
    model, windows: torch.Tensor, *, batch_size: int = 4, advance: Advance | None = None
) -> torch.Tensor:
    """Mean next-token NLL (nats) of each ``[N, seqlen]`` window, as a float64 tensor of length N."""
    device = model_device(model)
    nlls = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):
            nlls.append(mean_nll(logits[row, :-1], batch[row, 1:]).double().cpu())
        del logits
        if advance is not None:
            advance(batch.shape[0])
    return torch.stack(nlls)


def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, targets)`` over ``[positions, vocab]`` logits, LOGIT_POSITIONS at a time.

    Each position's loss is the same operation as in one call; the mean is ``nll_loss``'s own
    reduction over them, the one ``cross_entropy`` applies, so the result is the same bits."""
    losses = torch.cat([F.cross_entropy(logits[part].float(), targets[part], reduction="none")
                        for part in batch_slices(logits.shape[0], LOGIT_POSITIONS)])
    return F.nll_loss(-losses[:, None], torch.zeros_like(targets))


def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 4, advance: Advance | None = None
) -> tuple[Estimate, torch.Tensor]:
    """Perplexity over the windows with its delta-method error, and the per-window NLLs."""
    nlls = window_nlls(model, windows, batch_size=batch_size, advance=advance)
    return perplexity_estimate(nlls), nlls
