"""Minimal structured cuts for recovery tests (the real surgery lives in the actions package).

Channels/heads are chosen by weight norm, which is enough to damage a tiny model measurably.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from agent_prune.models.adapters import adapter_for


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach()[index].clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def cut_mlp(model: nn.Module, keep: int, layers: list[int] | None = None) -> nn.Module:
    """A copy of ``model`` keeping ``keep`` MLP channels (largest down_proj column norms) per layer."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.layers()):
        if layers is not None and i not in layers:
            continue
        mlp = adapter.mlp(layer)
        index = mlp.down_proj.weight.norm(dim=0).topk(keep).indices.sort().values
        mlp.gate_proj = _slice_linear(mlp.gate_proj, index, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, index, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, index, 1)
    return model


def cut_kv_group(model: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``model`` without the last KV group (and its query heads) in ``layers``."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    hd = adapter.head_dim
    for i in layers:
        layer = adapter.layers()[i]
        widths = adapter.layer_widths(layer)
        kv_keep = widths.num_kv_heads - 1
        q_keep = kv_keep * widths.heads_per_group
        attn = adapter.attention(layer)
        q_index, kv_index = torch.arange(q_keep * hd), torch.arange(kv_keep * hd)
        attn.q_proj = _slice_linear(attn.q_proj, q_index, 0)
        attn.k_proj = _slice_linear(attn.k_proj, kv_index, 0)
        attn.v_proj = _slice_linear(attn.v_proj, kv_index, 0)
        attn.o_proj = _slice_linear(attn.o_proj, q_index, 1)
        adapter.set_attention_heads(layer, q_keep, kv_keep)
    return model


def drop_layers(model: nn.Module, remove: list[int]) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` without the layers in ``remove``, and the kept layers' dense indices."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    kept = [i for i in range(adapter.num_layers) if i not in remove]
    adapter.keep_layers(kept)
    return model, kept
