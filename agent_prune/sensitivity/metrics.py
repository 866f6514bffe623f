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
- Block Influence (ShortGPT, arXiv 2403.03853): ``1 - E_tokens[cos(x_in, x_out)]``.
- Angular distance (Gromov et al., arXiv 2403.17887): ``arccos(cos(x_in, x_out)) / pi`` of the
  last token, averaged over samples (one block, n = 1).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8


# ---- Wanda -------------------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` for every weight; ``input_norm`` has one entry per input channel."""
    return weight.detach().abs().float() * input_norm.float().unsqueeze(0)


def input_channel_norm(sum_squares: torch.Tensor, samples: int) -> torch.Tensor:
    """Wanda's ``||X_j||_2`` from accumulated squares (mean over samples, as its reference code)."""
    return (sum_squares / max(samples, 1)).sqrt()


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as ``numpy.percentile``.

    Uses ``kthvalue`` (linear time) rather than ``torch.quantile``, which sorts and refuses
    inputs over 16M elements.
    """
    flat = values.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    position = q / 100.0 * (flat.numel() - 1)
    low = math.floor(position)
    low_value = flat.kthvalue(low + 1).values
    if low + 1 >= flat.numel() or position == low:
        return float(low_value)
    # The next order statistic: low_value again if it repeats, else the smallest larger value.
    repeats = int((flat <= low_value).sum()) >= low + 2
    high_value = low_value if repeats else flat[flat > low_value].min()
    return float(low_value) + (position - low) * (float(high_value) - float(low_value))


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


def kv_group_scores(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A KV group's score: the sum of the scores of the query heads that read it (GQA)."""
    return head_scores.reshape(num_kv_heads, -1).sum(dim=1)


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance ``|W * dL/dW|`` per weight (LLM-Pruner, element-wise)."""
    return (weight.detach().float() * grad.float()).abs()


def taylor_structures(
    taylor: dict[str, torch.Tensor], num_kv_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """Sum per-weight Taylor scores over the weights each structure owns.

    ``taylor`` maps projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj) to per-weight scores. A head owns its q_proj rows and o_proj columns; a KV group
    owns its heads plus its k_proj/v_proj rows; an MLP channel owns a gate_proj row, an up_proj
    row and a down_proj column.
    """
    q_rows = taylor["q_proj"].sum(dim=1).reshape(-1, head_dim).sum(dim=1)
    o_cols = taylor["o_proj"].sum(dim=0).reshape(-1, head_dim).sum(dim=1)
    heads = q_rows + o_cols
    kv_rows = (taylor["k_proj"].sum(dim=1) + taylor["v_proj"].sum(dim=1)).reshape(-1, head_dim).sum(dim=1)
    kv_groups = kv_group_scores(heads, num_kv_heads) + kv_rows
    channels = taylor["gate_proj"].sum(dim=1) + taylor["up_proj"].sum(dim=1) + taylor["down_proj"].sum(dim=0)
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
