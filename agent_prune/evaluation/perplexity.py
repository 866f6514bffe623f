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
from agent_prune.evaluation.scoring import model_device
from agent_prune.evaluation.stats import Estimate, perplexity_estimate


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
        # Row by row: each logits[i, :-1] is contiguous, so no copy of the whole batch's logits.
        for row in range(batch.shape[0]):
            nlls.append(F.cross_entropy(logits[row, :-1].float(), batch[row, 1:]).double().cpu())
        del logits
        if advance is not None:
            advance(batch.shape[0])
    return torch.stack(nlls)


def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 4, advance: Advance | None = None
) -> tuple[Estimate, torch.Tensor]:
    """Perplexity over the windows with its delta-method error, and the per-window NLLs."""
    nlls = window_nlls(model, windows, batch_size=batch_size, advance=advance)
    return perplexity_estimate(nlls), nlls
