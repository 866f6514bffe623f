"""Does a proposal fit this step's budget? Checked with the loop's own sizing rules
(``agent.candidates``), so a planner hears "that cannot deliver the step" before the loop builds an
empty candidate from it.

- depth: the loop removes the shortest prefix of the proposed layers that reaches the budget, but
  never overshoots it more than twice, nor removes more than is left to the target; when every
  removable layer is bigger than that, depth is not possible this step.
- width: at most half of a layer's MLP channels go per step, so a short list of layers may not hold
  the budget. Needs the model's hidden size (``PlannerContext.hidden_size``); skipped without it.
"""

from __future__ import annotations

import math

from agent_prune.agent.candidates import (
    LayerSize,
    kv_group_cost,
    mlp_channel_cost,
    size_depth,
    size_mlp,
    size_width,
)
from agent_prune.agent.proposal import PlannerContext, Proposal

MAX_OVERSHOOT = 2.0  # size_depth's default
MIN_SHARE = 0.5  # a width candidate must deliver at least half of the budget


def layer_sizes(context: PlannerContext) -> list[LayerSize]:
    return [LayerSize(r.index, r.params, r.heads, r.kv_heads, r.mlp_channels) for r in context.layers]


def depth_limit(context: PlannerContext) -> float:
    """The most parameters one depth step may remove: twice the budget, and no more than is left."""
    limit = MAX_OVERSHOOT * context.step_budget_params
    return limit if context.remaining_params is None else min(limit, context.remaining_params)


def removable_layers(context: PlannerContext) -> list[int]:
    """Layers depth may remove this step: not protected, not just rolled back, small enough."""
    avoid, limit = set(context.rejected_layers), depth_limit(context)
    return [r.index for r in context.layers
            if not r.protected and r.index not in avoid and r.params <= limit]


def open_branches(context: PlannerContext) -> list[str]:
    """The branches a proposal can use this step."""
    return [b for b in context.branches if b != "depth" or removable_layers(context)]


def mlp_capacity(context: PlannerContext, index: int) -> int:
    """Parameters the MLP of one layer can give this step (the sizing's per-layer cap)."""
    if context.hidden_size is None:
        return 0
    sizes = layer_sizes(context)
    channels = size_mlp([index], sizes, 10**15, context.hidden_size)
    return channels.get(index, 0) * mlp_channel_cost(context.hidden_size)


def width_min_layers(context: PlannerContext) -> int:
    """How many layers a width list should name to hold the whole budget (empty means all)."""
    capacities = [c for c in (mlp_capacity(context, r.index) for r in context.layers) if c > 0]
    if not capacities:
        return 1
    needed = math.ceil(context.step_budget_params / min(capacities))
    return min(len(capacities), max(1, needed))


def budget_problems(proposal: Proposal, context: PlannerContext) -> list[str]:
    problems = []
    budget = context.step_budget_params
    if proposal.depth is not None and proposal.depth.layers:
        limit = depth_limit(context)
        if "depth" not in open_branches(context):
            problems.append(f"depth is not possible this step: every layer is protected, just rolled "
                            f"back, or has more than {limit:,.0f} parameters ({MAX_OVERSHOOT:g}x the step "
                            f"budget of {budget:,}, or what is left to the target); use null for depth")
        elif not size_depth(proposal.depth, layer_sizes(context), budget, limit=context.remaining_params):
            first = context.layer(proposal.depth.layers[0])
            problems.append(f"depth.layers starts with layer {first.index} ({first.params:,} "
                            f"parameters), more than the {limit:,.0f} this step may remove "
                            f"({MAX_OVERSHOOT:g}x the step budget of {budget:,}, or what is left to the "
                            "target); put a smaller layer first")
    if proposal.width is not None and context.hidden_size and context.head_dim:
        plan = size_width(proposal.width, layer_sizes(context), budget, context.hidden_size,
                          context.head_dim)
        sizes = layer_sizes(context)
        removed = sum(c["mlp_channels"] * mlp_channel_cost(context.hidden_size)
                      + c["kv_groups"] * kv_group_cost(sizes[i], context.hidden_size, context.head_dim)
                      for i, c in plan.items())
        if removed < MIN_SHARE * budget:
            problems.append(f"width.layers {proposal.width.layers} can give only {removed:,} of the "
                            f"{budget:,} parameters this step needs (at most half of a layer's MLP "
                            "channels go per step); name more layers, or [] for all")
    return problems

