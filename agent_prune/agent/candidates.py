"""Turn a planner's proposal into concrete, budget-sized pruning actions (pure functions).

The planner says *where* (which layers, in what order, MLP vs attention share); this module says
*how much*, so that each candidate removes about one step budget of prunable parameters:
- depth: the prefix of the proposed layers whose parameters come closest to the budget (after
  width steps a layer is smaller than a dense one, and "reach the budget" would take two layers
  where one is nearly right);
- width: the MLP share of the budget split evenly over the proposed layers as channel counts
  (each channel costs gate row + up row + down column = 3 * hidden), capped per layer and
  redistributed when a cap binds; the attention share as whole KV groups (each costs its query
  heads' q rows and o columns plus its k and v rows), least important layers first.
Which channels or groups go inside a layer is the pruners' choice, from the profile's scores.
Serving shapes (``shape_mlp_cuts``) then move the MLP cuts so that kept widths are multiples of a
number, or the same in every layer, for engines that need aligned or uniform layers.
The loop then sizes the width candidate to what the depth candidate removes, so the two are
compared at the same size; neither passes the target, and on the step that reaches it width takes
the whole remainder (agent/nodes.py, ``build``).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_prune.agent.proposal import DepthProposal, WidthProposal


@dataclass(frozen=True)
class LayerSize:
    """What the sizing needs to know about one current layer."""

    index: int
    params: int
    num_heads: int
    num_kv_heads: int
    mlp_channels: int


def mlp_channel_cost(hidden: int) -> int:
    return 3 * hidden


MIN_MLP_CHANNELS = 8  # a thinned layer keeps at least this many channels


def mlp_cap(channels: int, max_fraction: float = 0.5, min_channels: int = MIN_MLP_CHANNELS) -> int:
    """MLP channels one step may take from a layer that has ``channels``."""
    return max(0, min(int(channels * max_fraction), channels - min_channels))


def kv_group_cost(layer: LayerSize, hidden: int, head_dim: int) -> int:
    heads_per_group = layer.num_heads // layer.num_kv_heads
    return (2 * heads_per_group + 2) * head_dim * hidden


def size_depth(proposal: DepthProposal, layers: list[LayerSize], budget: int,
               max_overshoot: float = 2.0, limit: float | None = None) -> list[int]:
    """Layers to remove: the prefix of the proposal closest to ``budget`` (ties: the larger) that
    stays within ``limit`` parameters (what is left to the target);
    [] if that is over ``max_overshoot`` budgets or every layer."""
    chosen, removed = [], 0
    for index in proposal.layers:
        if removed >= budget or (limit is not None and removed + layers[index].params > limit):
            break
        if chosen and budget - removed < removed + layers[index].params - budget:
            break  # stopping short is closer than taking the next layer
        chosen.append(index)
        removed += layers[index].params
    if not chosen or removed > max_overshoot * budget or len(chosen) >= len(layers):
        return []
    return sorted(chosen)


def size_mlp(layer_indices: list[int], layers: list[LayerSize], budget: int, hidden: int,
             max_fraction: float = 0.5, min_channels: int = MIN_MLP_CHANNELS,
             shares: list[float] | None = None) -> dict[int, int]:
    """Channels to remove per layer: ``budget`` split in proportion to ``shares`` (one per entry of
    ``layer_indices``; evenly without them), respecting per-layer caps; what a binding cap leaves
    goes to the other layers in proportion to their shares."""
    targets = layer_indices or [layer.index for layer in layers]
    weights = dict(zip(targets, shares)) if shares else dict.fromkeys(targets, 1.0)
    caps = {i: mlp_cap(layers[i].mlp_channels, max_fraction, min_channels) for i in targets}
    remaining = budget // mlp_channel_cost(hidden)
    counts = dict.fromkeys(targets, 0)
    while remaining > 0:
        open_layers = [i for i in targets if counts[i] < caps[i] and weights[i] > 0]
        if not open_layers:
            break
        total = sum(weights[i] for i in open_layers)
        ideal = {i: remaining * weights[i] / total for i in open_layers}
        # Whole channels by the floor of each ideal share; one more each, largest remainder first,
        # until the budget is placed (so a small step still moves).
        order = sorted(open_layers, key=lambda i: (-(ideal[i] - int(ideal[i])), i))
        grants = {i: int(ideal[i]) for i in open_layers}
        for i in order[: remaining - sum(grants.values())]:
            grants[i] += 1
        for i in order:
            take = min(grants[i], caps[i] - counts[i], remaining)
            counts[i] += take
            remaining -= take
    return {i: c for i, c in counts.items() if c > 0}


def size_kv_groups(layer_indices: list[int], layers: list[LayerSize], budget: int, hidden: int,
                   head_dim: int) -> dict[int, int]:
    """Whole KV groups to remove, one per layer in proposal order, never a layer's last group."""
    targets = layer_indices or [layer.index for layer in layers]
    counts: dict[int, int] = {}
    spent = 0
    for i in targets:
        cost = kv_group_cost(layers[i], hidden, head_dim)
        if layers[i].num_kv_heads <= 1 or spent + cost > budget:
            continue
        counts[i] = 1
        spent += cost
    return counts


def size_width(proposal: WidthProposal, layers: list[LayerSize], budget: int, hidden: int,
               head_dim: int) -> dict[int, dict[str, int]]:
    """Per layer ``{"mlp_channels": n, "kv_groups": g}`` for a width candidate of about ``budget``."""
    attention_budget = round((1.0 - proposal.mlp_share) * budget)
    groups = size_kv_groups(proposal.layers, layers, attention_budget, hidden, head_dim)
    spent = sum(kv_group_cost(layers[i], hidden, head_dim) * g for i, g in groups.items())
    channels = size_mlp(proposal.layers, layers, budget - spent, hidden, shares=proposal.mlp_shares)
    plan: dict[int, dict[str, int]] = {}
    for i in sorted(set(groups) | set(channels)):
        plan[i] = {"mlp_channels": channels.get(i, 0), "kv_groups": groups.get(i, 0)}
    return plan


def shape_mlp_cuts(cuts: dict[int, int], layers: list[LayerSize], multiple: int = 1,
                   uniform: bool = False) -> dict[int, int]:
    """``cuts`` (MLP channels to remove per layer) reshaped for serving, their total kept as close to
    the requested one as the shape allows: with ``uniform`` every layer is cut to one common width
    (a stock config that any engine loads); with ``multiple`` > 1 every thinned layer keeps a
    multiple of ``multiple`` channels (tensor-core and kernel-friendly widths)."""
    if uniform:
        return _uniform_cuts(sum(cuts.values()), layers, multiple)
    if multiple <= 1:
        return cuts
    shaped, movable = {}, []
    for i, cut in cuts.items():
        channels = layers[i].mlp_channels
        kept = channels - cut
        lower = kept // multiple * multiple      # kept width if this layer gives one multiple more
        upper = min(channels, lower + multiple) if lower < kept else kept
        shaped[i] = channels - upper
        if lower < upper and lower >= multiple and channels - lower <= mlp_cap(channels):
            movable.append(((kept - lower) / multiple, i, upper - lower))
    # Every layer first rounds toward keeping more; the layers nearest their lower multiple then
    # give it up while that brings the total closer to the request.
    deficit = sum(cuts.values()) - sum(shaped.values())
    for _, i, step in sorted(movable):
        if 2 * deficit < step:
            break
        shaped[i] += step
        deficit -= step
    return {i: c for i, c in shaped.items() if c > 0}


def _uniform_cuts(total: int, layers: list[LayerSize], multiple: int) -> dict[int, int]:
    """Cut every layer to the width that removes about ``total`` channels in all, rounded to
    ``multiple`` and within each layer's cap (a layer already narrower is left as it is)."""
    current = [layer.mlp_channels for layer in layers]
    multiple = max(multiple, 1)
    width = round((sum(current) - total) / len(layers) / multiple) * multiple
    floor = max(multiple, MIN_MLP_CHANNELS, max(c - mlp_cap(c) for c in current))
    width = max(width, -(-floor // multiple) * multiple)
    return {layer.index: layer.mlp_channels - width for layer in layers if layer.mlp_channels > width}
