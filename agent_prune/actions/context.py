"""What the action handlers share while one list of actions is planned and applied."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from agent_prune.actions.manifest import LayerRecord, Manifest
from agent_prune.actions.selection import OriginScores, Protected, weight_magnitude_scores
from agent_prune.errors import InvalidActionError
from agent_prune.models.adapters import FamilyAdapter
from agent_prune.models.offload import materialized

# Which axis of each projection is cut into which structure (the other axis is the hidden size).
UNIT_AXES = {
    "q_proj": (0, "heads"), "k_proj": (0, "kv_heads"), "v_proj": (0, "kv_heads"), "o_proj": (1, "heads"),
    "gate_proj": (0, "mlp_channels"), "up_proj": (0, "mlp_channels"), "down_proj": (1, "mlp_channels"),
}


def projection_roles(adapter: FamilyAdapter, layer: nn.Module) -> dict[str, str]:
    """Full module name in the layer ("mlp.down_proj") -> canonical projection name ("down_proj")."""
    canonical = {id(m): role for role, m in
                 (adapter.attention_projections(layer) | adapter.mlp_projections(layer)).items()}
    return {name: canonical[id(m)] for name, m in adapter.linear_modules(layer).items()}


def unit_size(attr: str, head_dim: int) -> int:
    return head_dim if attr in ("heads", "kv_heads") else 1


def feature_origins(role: str, axis: int, record: LayerRecord, head_dim: int, hidden: int) -> torch.Tensor:
    """Original feature index of every row (axis 0) or column (axis 1) of a projection."""
    unit_axis, attr = UNIT_AXES[role]
    if axis != unit_axis:
        return torch.arange(hidden)
    units = torch.as_tensor(getattr(record, attr), dtype=torch.long)
    size = unit_size(attr, head_dim)
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


@dataclass
class ApplyContext:
    """The model, and everything keyed by ORIGINAL indices so it survives renumbering.

    ``start`` is the manifest at call time: until execution begins the model is shaped like it,
    so fallback scores computed lazily during planning read unmodified weights.
    """

    adapter: FamilyAdapter
    start: Manifest
    given_scores: OriginScores
    protected: Protected
    input_norms: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    _fallback: OriginScores = field(default_factory=dict)

    def layer_of_source(self, source: int) -> nn.Module:
        position = next(i for i, r in enumerate(self.start.layers) if r.source == source)
        return self.adapter.layers()[position]

    def scores(self, source: int, kind: str) -> tuple[dict[int, float], str]:
        """Scores of one structure kind of original layer ``source``, and where they came from."""
        if kind in self.given_scores.get(source, {}):
            return self.given_scores[source][kind], "profile"
        if source not in self._fallback:
            record = next(r for r in self.start.layers if r.source == source)
            with materialized(self.layer_of_source(source)) as layer:
                values = weight_magnitude_scores(self.adapter, layer)
            self._fallback[source] = {
                kind: dict(zip(getattr(record, "kv_heads" if kind == "kv_groups" else kind), per_unit))
                for kind, per_unit in values.items()
            }
        return self._fallback[source][kind], "weight_magnitude"


def norms_by_origin(adapter: FamilyAdapter, manifest: Manifest, input_norms: Mapping | None
                    ) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-current-layer input-feature norms ``{layer: {"mlp.down_proj": [...]}}`` keyed by origin."""
    out: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer_key, modules in (input_norms or {}).items():
        layer = int(layer_key)
        if not 0 <= layer < len(manifest.layers):
            raise InvalidActionError(f"input norms name layer {layer}, the model has {len(manifest.layers)}",
                                     "pass norms collected on the current model")
        roles = projection_roles(adapter, adapter.layers()[layer])
        record = manifest.layers[layer]
        for name, values in modules.items():
            if name not in roles:
                raise InvalidActionError(f"input norms name unknown module '{name}'",
                                         f"use one of {', '.join(roles)}")
            norms = torch.as_tensor(values, dtype=torch.float32).flatten()
            origins = feature_origins(roles[name], 1, record, adapter.head_dim, adapter.hidden_size)
            if len(norms) != len(origins):
                raise InvalidActionError(f"input norms for layer {layer} {name} have {len(norms)} entries, "
                                         f"the module has {len(origins)} input features",
                                         "pass norms collected on the current model")
            out.setdefault(record.source, {})[name] = (origins, norms)
    return out
