"""Depth and width actions: plan on the manifest (pure), then cut the model to match."""

from __future__ import annotations

from agent_prune.actions.context import ApplyContext
from agent_prune.actions.manifest import AppliedAction, LayerRecord, Manifest
from agent_prune.actions.schema import PruneWidth, RemoveLayers
from agent_prune.actions.selection import lowest_scoring, resolve_amount
from agent_prune.actions.surgery import restructure
from agent_prune.errors import InvalidActionError

FORCE_HINT = "choose other structures, or set force=true to cut protected ones"


def check_layer(kind: str, layer: int, manifest: Manifest) -> None:
    count = len(manifest.layers)
    if not 0 <= layer < count:
        raise InvalidActionError(f"{kind}: layer {layer} does not exist (the model has {count} layers, "
                                 f"0-{count - 1})", "use the model's current layer numbering")


def _with_layers(manifest: Manifest, layers: list[LayerRecord], applied: AppliedAction) -> Manifest:
    """A copy of ``manifest`` with new layer records; side-tensor keys of dropped layers go too."""
    alive = {f"L{r.source}." for r in layers}

    def surviving(keys: list[str]) -> list[str]:
        return [k for k in keys if not k.startswith("L") or k[: k.index(".") + 1] in alive]

    return Manifest.model_validate({
        "base": manifest.base, "layers": layers, "actions": [*manifest.actions, applied],
        "masked": surviving(manifest.masked), "overridden": surviving(manifest.overridden),
    })


def plan_remove_layers(action: RemoveLayers, manifest: Manifest, ctx: ApplyContext) -> Manifest:
    for layer in action.layers:
        check_layer("remove_layers", layer, manifest)
    count = len(manifest.layers)
    if len(action.layers) >= count:
        raise InvalidActionError(f"remove_layers would remove all {count} layers", "keep at least one layer")
    sources = [manifest.source_of(i) for i in sorted(action.layers)]
    guarded = [i for i in sorted(action.layers) if _layer_protected(ctx, manifest.source_of(i))]
    if guarded and not action.force:
        raise InvalidActionError(f"remove_layers: layer(s) {guarded} hold protected structures "
                                 "(e.g. super weights)", FORCE_HINT)
    removed = set(action.layers)
    applied = AppliedAction(action=action, layer_sources=sources, removed={"layers": len(removed)},
                            effect=f"removed {len(removed)} of {count} layers (original indices {sources})")
    return _with_layers(manifest, [r for i, r in enumerate(manifest.layers) if i not in removed], applied)


def _layer_protected(ctx: ApplyContext, source: int) -> bool:
    return source in ctx.protected.layers or ctx.protected.any_in(source)


def _select(ctx: ApplyContext, action: PruneWidth, source: int, kind: str, candidates: list[int],
            count: int, protected: set[int], sources: dict[str, str]) -> list[int]:
    """Original indices to remove (lowest scores first); a clear error if protection forbids it."""
    if count == 0:
        return []
    scores, sources[kind] = ctx.scores(source, kind)
    try:
        return lowest_scoring(scores, candidates, count, protected, action.force)
    except ValueError:
        free = len([c for c in candidates if c not in protected])
        raise InvalidActionError(f"prune_width: layer {action.layer} cannot lose {count} {kind}: only {free} "
                                 f"of {len(candidates)} are unprotected", FORCE_HINT) from None


def _counts(action: PruneWidth, record: LayerRecord) -> tuple[int, int, int]:
    widths = record.widths()
    counts = (resolve_amount(action.kv_groups, widths.num_kv_heads),
              resolve_amount(action.heads, widths.heads_per_group),
              resolve_amount(action.mlp_channels, widths.intermediate_size))
    limits = (widths.num_kv_heads, widths.heads_per_group, widths.intermediate_size)
    names = ("KV groups", "query heads per KV group", "MLP channels")
    for count, limit, name in zip(counts, limits, names):
        if count >= limit:
            raise InvalidActionError(f"prune_width: layer {action.layer} has {limit} {name}; removing "
                                     f"{count} would leave none", f"remove at most {limit - 1}")
    if sum(counts) == 0:
        raise InvalidActionError(f"prune_width on layer {action.layer} removes nothing (amounts round to 0 "
                                 f"for widths {widths.model_dump()})", "give a larger count or fraction")
    return counts


def plan_prune_width(action: PruneWidth, manifest: Manifest, ctx: ApplyContext) -> Manifest:
    check_layer("prune_width", action.layer, manifest)
    record = manifest.layers[action.layer]
    n_kv, n_heads, n_channels = _counts(action, record)
    source, base_hpg = record.source, manifest.base.widths[record.source].heads_per_group
    # A protected head keeps its KV group; a protected KV group keeps all its heads.
    guarded_groups = ctx.protected.of(source, "kv_groups")
    guarded_heads = ctx.protected.of(source, "heads")
    guarded_heads |= {h for h in record.heads if h // base_hpg in guarded_groups}
    guarded_groups |= {h // base_hpg for h in guarded_heads}
    sources: dict[str, str] = {}

    cut_groups = _select(ctx, action, source, "kv_groups", record.kv_heads, n_kv, guarded_groups, sources)
    kv_keep = [g for g in record.kv_heads if g not in cut_groups]
    heads_keep = []
    for group in kv_keep:
        members = [h for h in record.heads if h // base_hpg == group]
        cut = _select(ctx, action, source, "heads", members, n_heads, guarded_heads, sources)
        heads_keep += [h for h in members if h not in cut]
    cut_channels = _select(ctx, action, source, "mlp_channels", record.mlp_channels, n_channels,
                           ctx.protected.of(source, "mlp_channels"), sources)
    new = LayerRecord(source=source, kv_heads=kv_keep, heads=heads_keep,
                      mlp_channels=[c for c in record.mlp_channels if c not in set(cut_channels)])

    old_w, new_w = record.widths(), new.widths()
    applied = AppliedAction(
        action=action, layer_sources=[source], score_sources=sources,
        removed={"kv_groups": n_kv, "heads": old_w.num_heads - new_w.num_heads, "mlp_channels": n_channels},
        effect=(f"layer {action.layer} (original {source}): heads {old_w.num_heads}->{new_w.num_heads}, "
                f"KV groups {old_w.num_kv_heads}->{new_w.num_kv_heads}, "
                f"MLP channels {old_w.intermediate_size}->{new_w.intermediate_size}"),
    )
    layers = list(manifest.layers)
    layers[action.layer] = new
    return _with_layers(manifest, layers, applied)


def execute_structural(action, before: Manifest, after: Manifest, ctx: ApplyContext) -> AppliedAction:
    restructure(ctx.adapter, before.layers, after.layers)
    return after.actions[-1]
