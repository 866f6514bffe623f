"""Physical surgery: slice linears, drop heads/KV groups/MLP channels, drop layers.

Every function here removes tensor rows/columns for real (``index_select`` copies, the old
parameters are freed) and leaves a working dense model: attention head counts are updated through
the adapter, layers are renumbered so the KV cache indexes them correctly. head_dim never changes,
so RoPE and per-head norms (Qwen3 q_norm/k_norm) stay valid.

Positions are indices into the layer as it is now; ``restructure`` turns two manifests' original
indices into positions, so incremental pruning and replay run the same code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from agent_prune.actions.manifest import LayerRecord
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.mapped import drop_mapped_pages
from agent_prune.models.offload import materialized, shared_memo


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> None:
    """Keep only output features ``rows`` and input features ``cols`` of ``linear`` (bias follows rows)."""
    with torch.no_grad():
        weight = linear.weight.detach()
        if rows is not None:
            weight = weight.index_select(0, rows.to(weight.device))
        if cols is not None:
            weight = weight.index_select(1, cols.to(weight.device))
        linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None and rows is not None:
            bias = linear.bias.detach().index_select(0, rows.to(weight.device))
            linear.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def unit_features(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Feature indices of whole units (heads of ``unit_size`` features): [1, 3], 4 -> [4..7, 12..15]."""
    return (units[:, None] * unit_size + torch.arange(unit_size)).reshape(-1)


def check_gqa(kv_keep: torch.Tensor, head_keep: torch.Tensor, heads_per_group: int) -> None:
    """Kept heads must sit in kept KV groups, the same number in each (GQA repeats KV heads evenly)."""
    groups = head_keep // heads_per_group
    per_group = len(head_keep) // max(len(kv_keep), 1)
    if per_group == 0 or not torch.equal(groups, kv_keep.repeat_interleave(per_group)):
        raise ValueError(f"heads {head_keep.tolist()} do not fill KV groups {kv_keep.tolist()} evenly")


def prune_attention(adapter: FamilyAdapter, layer: nn.Module, kv_keep: torch.Tensor,
                    head_keep: torch.Tensor) -> None:
    """Keep KV groups ``kv_keep`` and query heads ``head_keep`` (positions, ascending) of ``layer``."""
    widths = adapter.layer_widths(layer)
    check_gqa(kv_keep, head_keep, widths.heads_per_group)
    proj = adapter.attention_projections(layer)
    q_features = unit_features(head_keep, adapter.head_dim)
    kv_features = unit_features(kv_keep, adapter.head_dim)
    slice_linear(proj["q_proj"], rows=q_features)
    slice_linear(proj["k_proj"], rows=kv_features)
    slice_linear(proj["v_proj"], rows=kv_features)
    slice_linear(proj["o_proj"], cols=q_features)
    adapter.set_attention_heads(layer, len(head_keep), len(kv_keep))


def prune_mlp(adapter: FamilyAdapter, layer: nn.Module, channel_keep: torch.Tensor) -> None:
    """Keep MLP intermediate channels ``channel_keep`` of ``layer``."""
    slice_mlp(adapter.mlp(layer), channel_keep)


def slice_mlp(mlp: nn.Module, channel_keep: torch.Tensor) -> nn.Module:
    """Keep intermediate channels ``channel_keep`` of a gated MLP: gate/up rows and down_proj
    columns together; returns ``mlp``."""
    if len(channel_keep) == 0:
        raise ValueError("cannot remove every MLP channel")
    slice_linear(mlp.gate_proj, rows=channel_keep)
    slice_linear(mlp.up_proj, rows=channel_keep)
    slice_linear(mlp.down_proj, cols=channel_keep)
    return mlp


def positions_within(kept: Sequence[int], available: Sequence[int]) -> torch.Tensor:
    """Positions of ``kept`` inside ``available`` (both ascending original indices)."""
    available_t = torch.as_tensor(list(available), dtype=torch.long)
    kept_t = torch.as_tensor(list(kept), dtype=torch.long)
    positions = torch.searchsorted(available_t, kept_t)
    inside = positions < len(available_t)
    if not inside.all() or not torch.equal(available_t[positions], kept_t):
        raise ValueError(f"indices {list(kept)[:8]}... are not all present in {list(available)[:8]}...")
    return positions


def restructure_layer(adapter: FamilyAdapter, layer: nn.Module, old: LayerRecord, new: LayerRecord) -> None:
    """Cut ``layer`` (currently shaped like ``old``) down to ``new``."""
    if (new.kv_heads, new.heads) != (old.kv_heads, old.heads):
        prune_attention(adapter, layer, positions_within(new.kv_heads, old.kv_heads),
                        positions_within(new.heads, old.heads))
    if new.mlp_channels != old.mlp_channels:
        prune_mlp(adapter, layer, positions_within(new.mlp_channels, old.mlp_channels))


def cut_layer(adapter: FamilyAdapter, layer: nn.Module, old: LayerRecord, new: LayerRecord) -> None:
    """:func:`restructure_layer`, on the layer's values where it is offloaded (untouched if unchanged)."""
    if old != new:
        with materialized(layer, write=True):
            restructure_layer(adapter, layer, old, new)


def restructure(adapter: FamilyAdapter, old: list[LayerRecord], new: list[LayerRecord]) -> None:
    """Turn a model shaped like records ``old`` into one shaped like ``new`` (a subset of it)."""
    keep = _kept_positions(old, new)
    for position, record in zip(keep, new):
        cut_layer(adapter, adapter.layers()[position], old[position], record)
    _finish(adapter, keep, len(old))


def restructured_copy(model: nn.Module, old: list[LayerRecord], new: list[LayerRecord]) -> nn.Module:
    """A copy of ``model`` (shaped like ``old``, left untouched) cut down to ``new``.

    Equals ``restructure`` on ``copy.deepcopy(model)`` but copies one decoder layer at a time and cuts
    it before copying the next, and never copies removed layers: the transient is one layer, not a
    second whole model. One deepcopy memo serves every part, so the parts share one config as a
    whole-model deepcopy would (and, for an offloaded model, the modules outside its layers).
    """
    keep = _kept_positions(old, new)
    layers = adapter_for(model).layers()
    copied = nn.ModuleList()
    memo = {**shared_memo(model), id(layers): copied}  # the copy's layer list is filled below
    result = copy.deepcopy(model, memo)
    adapter = adapter_for(result)
    kept = dict(zip(keep, new))
    for position, layer in enumerate(layers):
        if position not in kept:
            copied.append(nn.Identity())  # dropped by _finish; never copied
            continue
        layer_copy = copy.deepcopy(layer, memo)
        drop_mapped_pages(layer)  # a source mapped from its file leaves the resident set as it is read
        cut_layer(adapter, layer_copy, old[position], kept[position])
        copied.append(layer_copy)
    _finish(adapter, keep, len(old))
    return result


def _kept_positions(old: list[LayerRecord], new: list[LayerRecord]) -> list[int]:
    positions = {record.source: i for i, record in enumerate(old)}
    if missing := [record.source for record in new if record.source not in positions]:
        raise ValueError(f"original layer {missing[0]} is not in the model any more")
    return [positions[record.source] for record in new]


def _finish(adapter: FamilyAdapter, keep: list[int], count: int) -> None:
    if keep != list(range(count)):
        adapter.keep_layers(keep)
    sync_config_widths(adapter)


def sync_config_widths(adapter: FamilyAdapter) -> None:
    """Make the config's global widths say the widest layer (exact when all layers agree).

    Forward passes never read them (attention reshapes with head_dim), but tools that save or
    pre-allocate do. head_dim is written first so no family re-derives it from the head count.
    """
    widths = [adapter.layer_widths(layer) for layer in adapter.layers()]
    config = adapter.config
    config.head_dim = adapter.head_dim
    config.num_attention_heads = max(w.num_heads for w in widths)
    config.num_key_value_heads = max(w.num_kv_heads for w in widths)
    config.intermediate_size = max(w.intermediate_size for w in widths)
