"""The mask action: Wanda-style weight masks on one layer (the agent-pruning paper's mode).

Masks zero weights in place; they make no tensor smaller, so every record of this action says
"no size or speed change". Weights of protected structures stay unmasked in unstructured mode; an
N:M pattern cannot keep them and is refused on such a layer unless forced.
"""

from __future__ import annotations

import torch

from agent_prune.actions.context import UNIT_AXES, ApplyContext, feature_origins, projection_roles, unit_size
from agent_prune.actions.manifest import AppliedAction, LayerRecord, Manifest
from agent_prune.actions.masks import NO_SIZE_CHANGE, n_m_keep_mask, unstructured_keep_mask, wanda_scores
from agent_prune.actions.schema import MaskSparsity
from agent_prune.actions.structural import FORCE_HINT, check_layer
from agent_prune.actions.surgery import positions_within
from agent_prune.errors import InvalidActionError
from agent_prune.models.offload import materialized


def _input_features(role: str, record: LayerRecord, head_dim: int, hidden: int) -> int:
    return len(feature_origins(role, 1, record, head_dim, hidden))


def plan_mask(action: MaskSparsity, manifest: Manifest, ctx: ApplyContext) -> Manifest:
    check_layer("mask_sparsity", action.layer, manifest)
    record = manifest.layers[action.layer]
    roles = projection_roles(ctx.adapter, ctx.adapter.layers()[0])
    if action.n_m is not None:
        m = action.n_m[1]
        for name, role in roles.items():
            features = _input_features(role, record, manifest.base.head_dim, manifest.base.hidden_size)
            if features % m:
                raise InvalidActionError(
                    f"mask_sparsity {action.pattern}: layer {action.layer} {name} has {features} input "
                    f"features, not a multiple of {m}",
                    "prune widths in multiples of M first, or use pattern unstructured")
        if ctx.protected.any_in(record.source) and not action.force:
            raise InvalidActionError(f"mask_sparsity {action.pattern} on layer {action.layer} would mask "
                                     "protected structures (an N:M pattern cannot keep them dense)",
                                     "use pattern unstructured (it keeps them), or " + FORCE_HINT)
    new = manifest.model_copy(deep=True)
    for name in roles:
        new.mark_masked(action.layer, name)
    scored = "wanda" if record.source in ctx.input_norms else "weight_magnitude"
    new.actions.append(AppliedAction(action=action, layer_sources=[record.source],
                                     score_sources={"weights": scored}, effect=NO_SIZE_CHANGE))
    return new


def _exempt(role: str, shape: torch.Size, record: LayerRecord, ctx: ApplyContext) -> torch.Tensor | None:
    """Weights of protected structures (their rows or columns), or None when there are none."""
    source, base_hpg = record.source, ctx.start.base.widths[record.source].heads_per_group
    groups = ctx.protected.of(source, "kv_groups")
    heads = ctx.protected.of(source, "heads") | {h for h in record.heads if h // base_hpg in groups}
    guarded = {"heads": heads, "kv_heads": groups | {h // base_hpg for h in heads},
               "mlp_channels": ctx.protected.of(source, "mlp_channels")}
    axis, attr = UNIT_AXES[role]
    flags = torch.tensor([unit in guarded[attr] for unit in getattr(record, attr)], dtype=torch.bool)
    if not flags.any():
        return None
    flags = flags.repeat_interleave(unit_size(attr, ctx.adapter.head_dim))
    return (flags[:, None] if axis == 0 else flags[None, :]).expand(shape)


def _norms(ctx: ApplyContext, record: LayerRecord, name: str, role: str) -> torch.Tensor | None:
    stored = ctx.input_norms.get(record.source, {}).get(name)
    if stored is None:
        return None
    origins, norms = stored
    current = feature_origins(role, 1, record, ctx.adapter.head_dim, ctx.adapter.hidden_size)
    return norms[positions_within(current.tolist(), origins.tolist())]


def execute_mask(action: MaskSparsity, before: Manifest, after: Manifest, ctx: ApplyContext) -> AppliedAction:
    layer = ctx.adapter.layers()[action.layer]
    record = before.layers[action.layer]
    zeroed = total = 0
    with torch.no_grad(), materialized(layer, write=True):
        for name, role in projection_roles(ctx.adapter, layer).items():
            weight = ctx.adapter.linear_modules(layer)[name].weight
            scores = wanda_scores(weight, _norms(ctx, record, name, role))
            if action.n_m is not None:
                keep = n_m_keep_mask(scores, *action.n_m)
            else:
                exempt = None if action.force else _exempt(role, weight.shape, record, ctx)
                keep = unstructured_keep_mask(scores, action.effective_ratio, exempt)
            weight.masked_fill_(~keep.to(weight.device), 0)
            zeroed += int((weight == 0).sum())
            total += weight.numel()
    applied = after.actions[-1]
    return applied.model_copy(update={
        "effect": f"{NO_SIZE_CHANGE}; layer {action.layer} (original {record.source}) now has {zeroed} "
                  f"of {total} linear weights at zero ({zeroed / total:.1%}, pattern {action.pattern})",
    })
