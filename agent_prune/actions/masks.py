"""Weight masks in the style of Wanda (Sun et al. 2023, arXiv 2306.11695).

Score each weight by |W_ij| * ||X_j||_2 (input-feature activation norm; |W_ij| alone when no norms
are known) and compare within each output row: unstructured zeroes the lowest ``ratio`` of every
row, N:M keeps the N highest of every M consecutive weights of a row. Masking zeroes weights in
place and changes no shape: no size or speed change on dense kernels.
"""

from __future__ import annotations

import torch

NO_SIZE_CHANGE = "no size or speed change (mask only: weights zeroed in place, every tensor keeps its shape)"


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor | None = None) -> torch.Tensor:
    scores = weight.detach().abs().float()
    if input_norms is not None:
        scores = scores * input_norms.to(scores.device, scores.dtype)[None, :]
    return scores


def unstructured_keep_mask(scores: torch.Tensor, ratio: float,
                           exempt: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask zeroing the ``int(ratio * columns)`` lowest scores of each row; exempt weights stay."""
    if exempt is not None:
        scores = scores.masked_fill(exempt, float("inf"))
    count = int(scores.shape[1] * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:
        lowest = torch.topk(scores, count, dim=1, largest=False).indices
        keep.scatter_(1, lowest, False)
    if exempt is not None:
        keep |= exempt
    return keep


def n_m_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping exactly the ``n`` highest of every ``m`` consecutive weights of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features are not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    top = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
    return keep.reshape(rows, cols)


def is_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive weights in a row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(2) <= n).all())
