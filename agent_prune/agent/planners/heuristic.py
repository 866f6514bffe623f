"""The deterministic planner: least sensitive structures first, read off the z-scored profile.

Rule (documented in the README):
- depth: rank layers by depth importance = mean z of block influence and angular distance
  (ShortGPT, Gromov et al.: a layer that barely changes its input is expendable); propose them
  least important first, never the first or last layer, protected layers, layers whose removal
  was just rolled back, or layers larger than the step may remove (``budget.removable_layers``).
  No depth candidate while layer removal lost its last ``DEPTH_PATIENCE`` tries by at least
  ``DEPTH_HOPELESS_Z`` standard errors, until ``DEPTH_RETRY_AFTER`` iterations after its last try.
- width: MLP channels only (on GQA models a single KV group is a large share of a layer's
  attention), chosen by the L2 pruner, in the per-layer amounts the profile suggests (``mlp_cut``:
  the step's channels ranked across layers by standardised L2 score, FLAP-style,
  :mod:`agent_prune.agent.allocation`). Without suggestions (a profile without L2 scores), thin
  evenly every layer whose width importance (mean z of the Wanda 10th-percentile score and the
  first-order Taylor score) is below ``spare_z``, least important first.
The loop evaluates the candidates (with, by default, a second width candidate sized by fluctuation
scores: ``RunOptions.alternative_sizings``) and keeps the best, so the rule only has to propose
sensible candidates, not pick between them.
"""

from __future__ import annotations

from agent_prune.agent.planners.base import Attempt, FailedStep, PlannerResult, ReflectionResult
from agent_prune.agent.planners.budget import removable_layers
from agent_prune.agent.proposal import (
    DepthProposal,
    LayerRow,
    PlannerContext,
    Proposal,
    Reflection,
    WidthProposal,
)

DEPTH_METRICS = ("block_influence", "angular_distance")
# A depth candidate costs a build and a scoring (about a third of an iteration on the shared model);
# where removal loses by 5-8 standard errors step after step (docs/benchmarks.md, "Loop cost") it
# changes no decision, so it rests after two decisive losses and is offered again three iterations
# after its last try, in case deeper cuts change the balance.
DEPTH_PATIENCE = 2
DEPTH_HOPELESS_Z = 4.0
DEPTH_RETRY_AFTER = 3
WIDTH_METRICS = ("wanda_p10", "taylor")


def mean_z(row: LayerRow, metrics: tuple[str, ...]) -> float:
    values = [row.z[m] for m in metrics if m in row.z]
    return sum(values) / len(values) if values else 0.0


class HeuristicPlanner:
    name = "heuristic"

    def __init__(self, spare_z: float = 1.0):
        self.spare_z = spare_z

    def describe(self) -> dict:
        return {"planner": self.name, "spare_z": self.spare_z}

    def propose(self, context: PlannerContext) -> PlannerResult:
        proposal = heuristic_proposal(context, self.spare_z)
        return PlannerResult(planner=self.name, proposal=proposal,
                             attempts=[Attempt(raw_reply=proposal.model_dump_json())])

    def reflect(self, context: PlannerContext, failed: FailedStep) -> ReflectionResult:
        tried = failed.proposal.depth.layers[:1] if failed.proposal.depth else []
        lesson = (f"Iteration {failed.iteration} was rolled back ({failed.outcome}). "
                  "Try other layers and a smaller step.")
        return ReflectionResult(planner=self.name,
                                reflection=Reflection(lesson=lesson, avoid_layers=tried))


def heuristic_proposal(context: PlannerContext, spare_z: float = 1.0) -> Proposal:
    last = context.num_layers - 1
    resting = depth_losses(context) if "width" in context.branches else None
    depth_order = sorted(context.layers, key=lambda r: (mean_z(r, DEPTH_METRICS), r.index))
    removable = set(removable_layers(context)) if not resting else set()
    depth_layers = [r.index for r in depth_order if r.index in removable and r.index not in (0, last)]
    suggested = sorted((r for r in context.layers if r.mlp_cut > 0), key=lambda r: (-r.mlp_cut, r.index))
    if suggested:
        width_layers = [r.index for r in suggested]
        shares = [float(r.mlp_cut) for r in suggested]
    else:
        width_order = sorted(context.layers, key=lambda r: (mean_z(r, WIDTH_METRICS), r.index))
        width_layers = [r.index for r in width_order if mean_z(r, WIDTH_METRICS) < spare_z]
        shares = None
    width = (WidthProposal(layers=width_layers, mlp_share=1.0, pruner="l2", mlp_shares=shares)
             if "width" in context.branches else None)
    depth = DepthProposal(layers=depth_layers) if depth_layers and "depth" in context.branches else None
    rationale = _rationale(context, depth_layers, width_layers, resting)
    return Proposal(rationale=rationale, depth=depth, width=width)


def depth_losses(context: PlannerContext) -> list[float] | None:
    """The margins (standard errors) by which layer removal lost its last ``DEPTH_PATIENCE`` tries,
    when all were decisive and the last was under ``DEPTH_RETRY_AFTER`` iterations ago; else None."""
    tried = [s for s in context.history if s.branch == "depth" or "depth" in s.rival_leads()]
    tries = tried[-DEPTH_PATIENCE:]
    if len(tries) < DEPTH_PATIENCE or context.iteration - tries[-1].iteration >= DEPTH_RETRY_AFTER:
        return None
    margins = [s.rival_leads().get("depth") for s in tries]
    lost = all(s.branch != "depth" and z is not None and z >= DEPTH_HOPELESS_Z
               for s, z in zip(tries, margins))
    return margins if lost else None


def _rationale(context: PlannerContext, depth_layers: list[int], width_layers: list[int],
               depth_lost: list[float] | None = None) -> str:
    parts = []
    if depth_lost:
        margins = ", ".join(f"z {z:+.1f}" for z in depth_lost)
        parts.append(f"no depth candidate: layer removal lost its last {len(depth_lost)} tries ({margins})")
    if depth_layers:
        first = context.layer(depth_layers[0])
        parts.append(f"layer {first.index} has the lowest depth importance "
                     f"(z={mean_z(first, DEPTH_METRICS):+.2f})")
    spared = context.num_layers - len(width_layers)
    if any(r.mlp_cut for r in context.layers):
        parts.append(f"thin MLP channels (L2 scores) in {len(width_layers)} layers in the suggested "
                     f"amounts, sparing {spared}")
    else:
        parts.append(f"thin MLP channels in {len(width_layers)} layers, sparing {spared} "
                     f"with width importance z >= 1")
    return "; ".join(parts) + "."
