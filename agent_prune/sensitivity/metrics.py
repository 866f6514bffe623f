"""Pure scoring functions: Wanda, structural importance, depth similarity, Taylor, z-scores.

Everything here takes tensors (or floats) and returns tensors (or floats); collectors and the
streaming driver decide what to feed in. Formulas and sources:

- Wanda (Sun et al., arXiv 2306.11695): ``S_ij = |W_ij| * ||X_j||_2``. The input-channel norm is
  accumulated as in the reference code (``scaler_row``): squared norms over each sample's tokens,
  averaged over samples, so ``||X_j|| = sqrt(sum_tokens x_j^2 / n_samples)``.
- Structural score (AMP, arXiv 2504.21174, as used by the MoP width candidate): a head's or an MLP
  channel's importance is the L1 norm of its input projected through ``o_proj`` / ``down_proj``,
  averaged over calibration tokens. A KV group's score is the sum over the query heads it serves.
- First-order Taylor (LLM-Pruner, arXiv 2305.11627): ``|W * dL/dW|`` per weight, summed over the
  weights a structure owns.
- Fluctuation (FLAP, An et al., arXiv 2312.11983): ``Var_tokens(x_j) * ||W[:, j]||_2^2``, how much
  of an input channel's contribution to the output varies from token to token (its mean part can be
  kept as a bias when the channel goes).
- Structured OBS (ZipLM, arXiv 2302.04089; SlimGPT, arXiv 2412.18110): removing input columns ``S``
  of a linear and refitting the rest on the same inputs raises the squared output error by
  ``tr(W_S [H^-1]_SS^-1 W_S^T)``, ``H = X^T X`` with per-feature damping.
- Block Influence (ShortGPT, arXiv 2403.03853): ``1 - E_tokens[cos(x_in, x_out)]``.
- Angular distance (Gromov et al., arXiv 2403.17887): ``arccos(cos(x_in, x_out)) / pi`` of the
  last token, averaged over samples (one block, n = 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-8
# Damping of the OBS scores, relative to each feature's own H_jj (as the refit's ridge); chosen by
# measurement (docs/benchmarks.md, "Width pruners"): lower values trust the calibration set's
# correlations more and picked worse channels on held-out text.
OBS_DAMPING = 1.0


# ---- Wanda -------------------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` for every weight; ``input_norm`` has one entry per input channel."""
    return weight.detach().float().abs().mul_(input_norm.float().unsqueeze(0))


def input_channel_norm(sum_squares: torch.Tensor, samples: int) -> torch.Tensor:
    """Wanda's ``||X_j||_2`` from accumulated squares (mean over samples, as its reference code)."""
    return (sum_squares / max(samples, 1)).sqrt()


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as ``numpy.percentile``.

    A selection (linear time) of the two order statistics around the position, not a sort;
    ``torch.quantile`` sorts and refuses inputs over 16M elements.
    """
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    position = q / 100.0 * (flat.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, flat.numel() - 1)
    if flat.device.type == "cpu":
        selected = np.partition(flat.float().numpy(), (low, high))  # one pass for both
        low_value, high_value = float(selected[low]), float(selected[high])
    else:
        low_value = float(flat.kthvalue(low + 1).values)
        high_value = float(flat.kthvalue(high + 1).values)
    return low_value + (position - low) * (high_value - low_value)


# ---- structures --------------------------------------------------------------------------------
def head_output_l1(head_inputs: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per token and head, ``||W_o[:, head] @ z_head||_1`` (AMP head importance, before averaging).

    ``head_inputs`` is the ``o_proj`` input ``(tokens, heads * head_dim)``; returns ``(tokens, heads)``.
    """
    tokens = head_inputs.shape[0]
    heads = head_inputs.shape[1] // head_dim
    z = head_inputs.reshape(tokens, heads, head_dim).float()
    w = o_weight.detach().float().reshape(o_weight.shape[0], heads, head_dim)
    return torch.einsum("thd,ohd->tho", z, w).abs().sum(dim=2)


def channel_output_l1(abs_input_sum: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """AMP channel importance summed over tokens: ``sum_t |a_tj| * ||W_down[:, j]||_1``."""
    return abs_input_sum.float() * down_weight.detach().abs().float().sum(dim=0)


def column_l2_scores(sum_squares: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per input column ``j`` of a linear, ``||X_j||_2 * ||W[:, j]||_2``: the norm of what that input
    channel writes to the output (Wanda-sp's structured score with L2 norms, arXiv 2312.11983)."""
    return sum_squares.double().sqrt().float() * weight.detach().float().norm(dim=0)


def l2_structures(channel_scores: torch.Tensor, o_sum_squares: torch.Tensor, o_weight: torch.Tensor,
                  num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """L2 structure scores: an MLP channel's :func:`column_l2_scores` of ``down_proj``; a head's is the
    root of the summed squares of its ``o_proj`` columns' scores; a KV group sums its heads."""
    heads = column_l2_scores(o_sum_squares, o_weight).pow(2).reshape(-1, head_dim).sum(dim=1).sqrt()
    return {"kv_groups": kv_group_scores(heads, num_kv_heads), "heads": heads, "mlp_channels": channel_scores}


def column_fluctuation_scores(sums: torch.Tensor, sum_squares: torch.Tensor, tokens: int,
                              weight: torch.Tensor) -> torch.Tensor:
    """Per input column ``j``, ``Var_tokens(x_j) * ||W[:, j]||_2^2`` (FLAP's fluctuation metric)."""
    n = max(tokens, 1)
    variance = (sum_squares.double() / n - (sums.double() / n) ** 2).clamp_min(0.0)
    return (variance * weight.detach().double().pow(2).sum(dim=0)).float()


# Columns per block of a Gram matrix (:func:`gram`): only the blocks on and above the diagonal are
# multiplied and the rest mirrored. The refit's Gram matrices (about 1300 kept channels over 4096
# tokens a batch for the shared model) were a large share of its walk's products on 2 cores
# (docs/benchmarks.md, "At the targets: three cuts").
GRAM_BLOCK = 256


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x.T @ x`` for rows ``x`` (tokens x features), in ``x``'s dtype, from the blocks on and above
    the diagonal: a Gram matrix is symmetric, so about half the products of the whole one."""
    width = x.shape[1]
    out = torch.empty(width, width, dtype=x.dtype, device=x.device)
    for start in range(0, width, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, width)
        out[start:stop, start:] = x[:, start:stop].T @ x[:, start:]
        out[stop:, start:stop] = out[start:stop, stop:].T
    return out


def damped_inverse(xtx: torch.Tensor, damping: float) -> torch.Tensor:
    """``(H + damping * diag(H))^-1`` in float64, the per-feature damping of :mod:`recovery.ridge`
    (a tiny absolute floor keeps features that never fired invertible)."""
    h = xtx.double()
    diag = torch.diagonal(h)
    return torch.linalg.inv(h + torch.diag(damping * diag + 1e-8 * float(diag.mean()) + 1e-12))


def obs_group_scores(xtx: torch.Tensor, weight: torch.Tensor, group: int, damping: float) -> torch.Tensor:
    """Structured OBS saliency of each block of ``group`` consecutive input columns of ``weight``:
    the squared output error that removing the block leaves after the best refit of the others,
    ``tr(W_S [H^-1]_SS^-1 W_S^T)``. ``group=1`` gives ``||W[:, j]||^2 / [H^-1]_jj`` per column."""
    h_inv = damped_inverse(xtx, damping)
    w = weight.detach().double()
    blocks = w.shape[1] // group
    if group == 1:
        return (w.pow(2).sum(dim=0) / torch.diagonal(h_inv).clamp_min(1e-300)).float()
    scores = torch.empty(blocks, dtype=torch.float64)
    for b in range(blocks):
        cols = slice(b * group, (b + 1) * group)
        w_s = w[:, cols]
        scores[b] = torch.trace(w_s @ torch.linalg.solve(h_inv[cols, cols], w_s.T))
    return scores.float()


def structures_from_columns(mlp_channels: torch.Tensor, head_columns: torch.Tensor, num_kv_heads: int,
                            head_dim: int) -> dict[str, torch.Tensor]:
    """Additive per-column scores of ``o_proj`` summed into heads (and heads into KV groups)."""
    heads = head_columns.reshape(-1, head_dim).sum(dim=1)
    return {"kv_groups": kv_group_scores(heads, num_kv_heads), "heads": heads, "mlp_channels": mlp_channels}


def kv_group_scores(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A KV group's score: the sum of the scores of the query heads that read it (GQA)."""
    return head_scores.reshape(num_kv_heads, -1).sum(dim=1)


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance ``|W * dL/dW|`` per weight (LLM-Pruner, element-wise)."""
    return (weight.detach().float() * grad.detach().float()).abs_()


# Projections whose output rows belong to a structure; the others (o_proj, down_proj) own columns.
ROW_OWNED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def owned_sums(projection: str, scores: torch.Tensor) -> torch.Tensor:
    """Per-weight scores summed over what one structure unit owns: rows, or columns for o/down."""
    return scores.sum(dim=1) if projection in ROW_OWNED else scores.sum(dim=0)


def taylor_structures(
    sums: dict[str, torch.Tensor], num_kv_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """Structure scores from per-projection :func:`owned_sums` of per-weight Taylor scores.

    A head owns its q_proj rows and o_proj columns; a KV group owns its heads plus its
    k_proj/v_proj rows; an MLP channel owns a gate_proj row, an up_proj row and a down_proj column.
    """
    heads = (sums["q_proj"] + sums["o_proj"]).reshape(-1, head_dim).sum(dim=1)
    kv_rows = (sums["k_proj"] + sums["v_proj"]).reshape(-1, head_dim).sum(dim=1)
    kv_groups = kv_group_scores(heads, num_kv_heads) + kv_rows
    channels = sums["gate_proj"] + sums["up_proj"] + sums["down_proj"]
    return {"kv_groups": kv_groups, "heads": heads, "mlp_channels": channels}


# ---- depth -------------------------------------------------------------------------------------
def token_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token's hidden state before and after a block (last dim)."""
    return torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=EPS)


def angular_distance(cosine: torch.Tensor) -> torch.Tensor:
    """``arccos(cos) / pi`` (Gromov et al.), clamped so rounding never yields NaN."""
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


# ---- across layers -----------------------------------------------------------------------------
def zscores(values: list[float | None], eps: float = EPS) -> list[float | None]:
    """``(x - mean) / (std + eps)`` across layers (population std); None stays None.

    ``eps`` is relative to the metric's scale (``eps * |mean|``): Taylor scores can be 1e-7 in
    absolute terms, where a fixed 1e-8 would shrink the z-scores; equal values still give 0.
    """
    present = [v for v in values if v is not None]
    if not present:
        return [None for _ in values]
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
    denominator = std + eps * max(abs(mean), 1e-12)
    return [None if v is None else (v - mean) / denominator for v in values]
