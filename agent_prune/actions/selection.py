"""Choosing what to cut: importance scores in, the lowest-scoring structures out.

Scores come from the sensitivity profile, per CURRENT layer, as plain mappings (higher = more
important)::

    {"kv_groups": [float] * num_kv_heads, "heads": [float] * num_heads,
     "mlp_channels": [float] * intermediate_size}

They are re-keyed by original indices here so that they stay attached to the right structure
while earlier actions in the same list renumber layers and shrink widths. Without scores the
fallback is :func:`weight_magnitude_scores`, a weight-only structured score (Wanda-sp of An et al.
2024, arXiv 2312.11983, with unit activation norms: the L1 norm of every weight that goes with the
structure); manifests record which source each action used.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from agent_prune.actions.manifest import Manifest
from agent_prune.errors import InvalidActionError
from agent_prune.models.adapters import FamilyAdapter

STRUCTURE_KINDS = ("kv_groups", "heads", "mlp_channels")
PROTECTED_KINDS = {"layer": None, "kv_group": "kv_groups", "head": "heads", "mlp_channel": "mlp_channels"}

# source layer -> structure kind -> original index -> score
OriginScores = dict[int, dict[str, dict[int, float]]]


def resolve_amount(amount: int | float | None, available: int) -> int:
    """An action's amount as a count: ints as given, fractions of ``available`` rounded to nearest."""
    if amount is None:
        return 0
    if isinstance(amount, int):
        return amount
    return math.floor(amount * available + 0.5)


def lowest_scoring(scores: Mapping[int, float], candidates: Sequence[int], count: int,
                   protected: Collection[int] = (), force: bool = False) -> list[int]:
    """The ``count`` candidates with the lowest scores (ties: lower index first), ascending.

    Protected candidates are skipped; with ``force`` they are allowed but still taken last.
    Raises ValueError when too few candidates are eligible.
    """
    pool = [c for c in candidates if force or c not in protected]
    if count > len(pool):
        raise ValueError(f"{count} requested, {len(pool)} eligible")
    ranked = sorted(pool, key=lambda c: (c in protected, scores[c], c))
    return sorted(ranked[:count])


def weight_magnitude_scores(adapter: FamilyAdapter, layer: nn.Module) -> dict[str, list[float]]:
    """Weight-only structure scores of one layer (no calibration data).

    head: |W_q| of its rows + |W_o| of its columns; KV group: |W_k| + |W_v| of its rows plus its
    heads' scores; MLP channel: |W_gate| + |W_up| of its row + |W_down| of its column (L1 norms).
    """
    widths, head_dim = adapter.layer_widths(layer), adapter.head_dim
    attn, mlp = adapter.attention_projections(layer), adapter.mlp_projections(layer)
    with torch.no_grad():
        def rows(lin: nn.Linear) -> torch.Tensor:
            return lin.weight.abs().sum(dim=1, dtype=torch.float64)

        def cols(lin: nn.Linear) -> torch.Tensor:
            return lin.weight.abs().sum(dim=0, dtype=torch.float64)

        heads = (rows(attn["q_proj"]) + cols(attn["o_proj"])).view(widths.num_heads, head_dim).sum(1)
        kv_rows = (rows(attn["k_proj"]) + rows(attn["v_proj"])).view(widths.num_kv_heads, head_dim).sum(1)
        kv_groups = kv_rows + heads.view(widths.num_kv_heads, widths.heads_per_group).sum(1)
        channels = rows(mlp["gate_proj"]) + rows(mlp["up_proj"]) + cols(mlp["down_proj"])
    return {"kv_groups": kv_groups.tolist(), "heads": heads.tolist(), "mlp_channels": channels.tolist()}


def _current_indices(manifest: Manifest, layer: int, kind: str) -> list[int]:
    return getattr(manifest.layers[layer], "kv_heads" if kind == "kv_groups" else kind)


def scores_by_origin(manifest: Manifest, scores: Mapping | Sequence | None) -> OriginScores:
    """Re-key per-current-layer scores by original layer and structure indices; check their lengths."""
    if scores is None:
        return {}
    items = scores.items() if isinstance(scores, Mapping) else enumerate(scores)
    out: OriginScores = {}
    for layer_key, per_kind in items:
        layer = int(layer_key)
        if not 0 <= layer < len(manifest.layers):
            raise InvalidActionError(f"scores name layer {layer}, the model has {len(manifest.layers)}",
                                     "pass scores from a profile of the current model")
        source = manifest.source_of(layer)
        for kind, values in (per_kind or {}).items():
            if kind not in STRUCTURE_KINDS:
                continue
            indices = _current_indices(manifest, layer, kind)
            if len(values) != len(indices):
                raise InvalidActionError(
                    f"scores for layer {layer} {kind} have {len(values)} entries, the layer has "
                    f"{len(indices)}",
                    "pass scores from a profile of the current model")
            out.setdefault(source, {})[kind] = dict(zip(indices, map(float, values)))
    return out


@dataclass
class Protected:
    """Protected structures (e.g. super weights), by original indices: never cut unless forced."""

    layers: set[int] = field(default_factory=set)
    units: dict[str, set[tuple[int, int]]] = field(
        default_factory=lambda: {kind: set() for kind in STRUCTURE_KINDS})

    def of(self, source: int, kind: str) -> set[int]:
        return {index for src, index in self.units[kind] if src == source}

    def any_in(self, source: int) -> bool:
        return any(self.of(source, kind) for kind in STRUCTURE_KINDS)


def protected_by_origin(manifest: Manifest, items: Iterable[Mapping]) -> Protected:
    """Convert ``[{layer, kind, index}, ...]`` (current indices) into a :class:`Protected`."""
    out = Protected()
    for item in items:
        kind, layer = item.get("kind"), item.get("layer")
        if kind not in PROTECTED_KINDS or not isinstance(layer, int) or not 0 <= layer < len(manifest.layers):
            raise InvalidActionError(f"protected item {dict(item)} names no existing structure",
                                     f"use {{layer, kind, index}} with kind in {', '.join(PROTECTED_KINDS)}")
        source = manifest.source_of(layer)
        if kind == "layer":
            out.layers.add(source)
            continue
        structure = PROTECTED_KINDS[kind]
        indices = _current_indices(manifest, layer, structure)
        index = item.get("index")
        if not isinstance(index, int) or not 0 <= index < len(indices):
            raise InvalidActionError(f"protected item {dict(item)} has no valid index",
                                     f"layer {layer} has {len(indices)} {structure}")
        out.units[structure].add((source, indices[index]))
    return out
