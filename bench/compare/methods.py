"""The baselines as agent-prune actions: pure functions from scores and a manifest to an action list.

- ShortGPT (Men et al., arXiv 2403.03853): Block Influence ``BI_i = 1 - E_t[cos(x_i, x_{i+1})]``
  measured once on the dense model; the ``n`` layers with the lowest BI are removed in one shot,
  ``n`` being the layer count nearest to the target fraction of prunable parameters.
- Wanda-sp (An et al., FLAP, arXiv 2312.11983, their structured Wanda baseline): for ``o_proj`` and
  ``down_proj``, ``S = |W| * ||X_j||`` averaged over output rows gives a score per input column; a
  head's score is the sum over its ``head_dim`` columns. Every layer loses the same share (uniform),
  lowest scores first, layer after layer on the already pruned model's activations. On GQA models
  query heads go in equal numbers from every KV group and MLP channels make up the rest of each
  layer's share (:func:`agent_prune.actions.presets.uniform_width_actions`).
- MoP fixed rule (arXiv 2602.06127): each step, a depth candidate removing the third-to-last layer
  and a width candidate with AMP scores (arXiv 2504.21174: L1 norm of a head's / neuron's input
  projected through ``o_proj`` / ``down_proj``) removing about one layer's parameters spread evenly
  over the layers; on GQA models a whole KV group goes from a layer when a running fractional count
  reaches one. The candidate closer to the dense model wins (see :mod:`bench.compare.mop`).
- The loop's own width pruners as one-shot methods (issue 15): the sensitivity profile's structure
  scores of MLP channels (``l2``: ||X_j||_2 * ||W_down[:, j]||_2; ``taylor``: |W * dL/dW| summed per
  channel), the whole count ranked across layers after standardising each layer's scores (FLAP's
  allocation, :func:`agent_prune.agent.allocation.global_allocation`), at most ``MAX_LAYER_CUT`` of a
  layer; with ``reconstruct`` the loop's refit of each cut ``down_proj`` toward the dense MLP.
"""

from __future__ import annotations

import math

import torch

from agent_prune.actions import Manifest, PruneWidth, RemoveLayers
from agent_prune.agent.allocation import global_allocation
from agent_prune.agent.candidates import mlp_channel_cost

MAX_LAYER_CUT = 0.6  # one-shot width: no layer loses more than this share of its MLP channels


def layer_params(manifest: Manifest, layer: int) -> int:
    """Prunable parameters (decoder linear weights) of current layer ``layer``."""
    w, hidden, head_dim = manifest.layers[layer].widths(), manifest.base.hidden_size, manifest.base.head_dim
    return 2 * hidden * head_dim * (w.num_heads + w.num_kv_heads) + 3 * hidden * w.intermediate_size


def layers_for_target(manifest: Manifest, target: float) -> int:
    """How many (dense-sized) layers make up the fraction ``target`` of the prunable parameters."""
    return max(1, round(target * manifest.base.prunable_parameters / layer_params(manifest, 0)))


def shortgpt_actions(block_influence: list[float], manifest: Manifest, target: float) -> list[RemoveLayers]:
    """Remove the lowest-Block-Influence layers (ties: lower index first), as many as ``target`` needs."""
    count = layers_for_target(manifest, target)
    order = sorted(range(len(block_influence)), key=lambda i: (block_influence[i], i))
    return [RemoveLayers(layers=sorted(order[:count]), force=True)]


def wanda_sp_scores(o_weight: torch.Tensor, o_norm: torch.Tensor, down_weight: torch.Tensor,
                    down_norm: torch.Tensor, head_dim: int, num_kv_heads: int) -> dict[str, list[float]]:
    """Wanda-sp structure scores of one layer (FLAP's ``prune_wanda_sp``), higher = more important.

    ``*_norm`` are Wanda's per-input-channel ``||X_j||_2`` of ``o_proj`` and ``down_proj``.
    """
    heads = (o_weight.abs().float() * o_norm.float()[None, :]).mean(dim=0).view(-1, head_dim).sum(dim=1)
    channels = (down_weight.abs().float() * down_norm.float()[None, :]).mean(dim=0)
    groups = heads.view(num_kv_heads, -1).sum(dim=1)
    return {"kv_groups": groups.tolist(), "heads": heads.tolist(), "mlp_channels": channels.tolist()}


def mop_depth_actions(manifest: Manifest) -> list[RemoveLayers]:
    """MoP's depth candidate as in its published code: remove the third-to-last layer."""
    return [RemoveLayers(layers=[len(manifest.layers) - 3], force=True)]


def mop_width_actions(manifest: Manifest, budget: int, kv_credit: dict[int, float]
                      ) -> tuple[list[PruneWidth], dict[int, float]]:
    """MoP's width candidate: about ``budget`` parameters, the same share from every layer.

    Each layer's share is ``budget / layers``. Attention: the layer's running fractional count of KV
    groups (``kv_credit``, by original layer index) grows by the share's attention part, the
    attention fraction of the layer's parameters, in groups; whole groups go when it reaches one (never
    the last group). MLP channels take the rest of the share. Returns the actions and the new counts.
    """
    hidden, head_dim = manifest.base.hidden_size, manifest.base.head_dim
    share = budget / len(manifest.layers)
    actions, credit = [], dict(kv_credit)
    for index, record in enumerate(manifest.layers):
        w = record.widths()
        attention = 2 * hidden * head_dim * (w.num_heads + w.num_kv_heads)
        group_cost = 2 * hidden * head_dim * (w.heads_per_group + 1)
        credit[record.source] = credit.get(record.source, 0.0) + share * attention / (
            layer_params(manifest, index) * group_cost)
        groups = min(math.floor(credit[record.source]), w.num_kv_heads - 1)
        credit[record.source] -= groups
        channels = max(0, round((share - groups * group_cost) / (3 * hidden)))
        channels = min(channels, w.intermediate_size - 1)
        actions.append(PruneWidth(layer=index, kv_groups=groups or None, mlp_channels=channels or None,
                                  force=True))
    return [a for a in actions if a.kv_groups or a.mlp_channels], credit


def channels_per_layer(scores: list[list[float]], total: int, allocation: str) -> list[int]:
    """How many of ``total`` MLP channels each layer gives up: ``even`` (the same count everywhere)
    or ``global`` (standardised scores ranked across layers, capped at ``MAX_LAYER_CUT``)."""
    sizes = [len(s) for s in scores]
    if allocation == "even":
        base, extra = divmod(total, len(sizes))
        return [base + (1 if i < extra else 0) for i in range(len(sizes))]
    return global_allocation(scores, total, [int(MAX_LAYER_CUT * n) for n in sizes])


def width_actions(channel_scores: list[list[float]], manifest: Manifest, target: float,
                  allocation: str = "global") -> list[PruneWidth]:
    """MLP-channel cuts removing ``target`` of the prunable parameters, lowest scores first."""
    total = round(target * manifest.base.prunable_parameters / mlp_channel_cost(manifest.base.hidden_size))
    counts = channels_per_layer(channel_scores, total, allocation)
    return [PruneWidth(layer=i, mlp_channels=c, force=True) for i, c in enumerate(counts) if c]
