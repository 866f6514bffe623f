"""The loop's nodes. Each takes the JSON state, does one stage, and returns a partial update.

Nodes are safe to re-run after a crash: candidates and accepted steps are written to fixed paths
(overwritten on a rerun), and step numbers come from the state, not from counters in memory.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from agent_prune.agent import decisions, profiling
from agent_prune.agent.allocation import global_allocation
from agent_prune.agent.building import PROFILE_FILE
from agent_prune.agent.candidates import (
    MIN_MLP_CHANNELS,
    LayerSize,
    mlp_cap,
    mlp_channel_cost,
    shape_mlp_cuts,
    size_depth,
    size_width,
)
from agent_prune.agent.planners.base import FailedStep
from agent_prune.agent.proposal import LayerRow, PlannerContext, Proposal, StepRecord, WidthProposal
from agent_prune.agent.runtime import RunContext
from agent_prune.agent.trace import Stopwatch
from agent_prune.io import atomic_write_json, read_json

TARGET_TOLERANCE = 0.002  # a run within 0.2 points of its target sparsity has reached it
# Suggestions never thin a layer's MLP below this share of its dense width: per-layer z-scores give
# every layer a low tail, so repeated steps could otherwise hollow out the same cheap layers.
MIN_MLP_KEPT = 1 / 3


# The channel scores whose standardised global ranking sizes each layer's share of a step: the
# suggestion shown to planners (LayerRow.mlp_cut) is L2's; the run builds width candidates sized by
# the others too (RunOptions.alternative_sizings) and keeps the best.
SIZING_FIELDS = {"l2": "structures_l2", "fluctuation": "structures_fluctuation"}
# Default step: three layers' worth of prunable parameters. On the shared model at 20% two layers'
# worth tied one layer's in half the steps, and three layers' worth tied two in two steps instead of
# three, 23% less wall time (docs/benchmarks.md, "Step size", "Three layers a step").
DEFAULT_STEP_LAYERS = 3
# What is left to the target after a step, as a share of a step, below which that step takes it too.
ABSORBED_REMAINDER = 0.5


def suggested_mlp_cuts(profile: dict, budget: int, hidden: int, dense_channels: int,
                       sizing: str = "l2") -> list[int]:
    """Per current layer, the MLP channels a step of ``budget`` parameters would take from it under
    the global ranking of standardised ``sizing`` channel scores (zeros for profiles without them)."""
    layers = profile["layers"]
    field = SIZING_FIELDS[sizing]
    if not all(layer.get(field) for layer in layers):
        return [0] * len(layers)
    floor = max(math.ceil(MIN_MLP_KEPT * dense_channels), MIN_MLP_CHANNELS)
    caps = [mlp_cap(layer["intermediate_size"], min_channels=floor) for layer in layers]
    scores = [layer[field]["mlp_channels"] for layer in layers]
    return global_allocation(scores, budget // mlp_channel_cost(hidden), caps)


def with_suggested_shares(width: WidthProposal, cuts: list[int]) -> WidthProposal:
    """``width`` with the suggested per-layer amounts ``cuts`` where the planner gave none."""
    if width.mlp_shares is not None:
        return width
    layers = width.layers or list(range(len(cuts)))
    shares = [float(cuts[i]) for i in layers]
    return width.model_copy(update={"mlp_shares": shares}) if sum(shares) > 0 else width


class LoopNodes:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    # ---- start ---------------------------------------------------------------------------------
    def start(self, state: dict) -> dict:
        ctx = self.ctx
        with Stopwatch() as watch:
            dense = ctx.steps.commit_dense()
        planner = getattr(ctx.planner, "describe", lambda: {"planner": ctx.options.planner})()
        ctx.trace.event("start", duration_s=watch.seconds, options=ctx.options.model_dump(),
                        planner=planner, dense=dense)
        ctx.reporter.started(ctx.options, dense)
        return {
            "status": "running", "iteration": 0, "dense": dense,
            "current": {"step": 0, "dir": dense["dir"], "sparsity": 0.0, "params": dense["params"],
                        "record": dense["record"]},
            "history": [], "reflections": [], "rejected_layers": [], "rejections": 0,
            "step_scale": 1.0, "candidates": [], "proposal": None, "decision": None,
        }

    # ---- profile -------------------------------------------------------------------------------
    def profile(self, state: dict) -> dict:
        ctx = self.ctx
        step = state["current"]["step"]
        path = ctx.run_dir / "profiles" / f"step-{step:04d}.json"
        cached = False
        with Stopwatch() as watch:
            if not path.is_file():
                state_dir = Path(state["current"]["dir"])
                measure = partial(self.measure_profile, state_dir)
                if step == 0:  # the dense model's profile: the same for every run of the model
                    profile, cached = ctx.scoring.dense_profile(measure)
                else:  # an accepted candidate's build measured it on the way, unless it could not
                    profile = self.built_profile(state_dir) or measure()
                atomic_write_json(path, profile)
            profile = read_json(path)
        ctx.trace.event("profile", iteration=state["iteration"] + 1, duration_s=watch.seconds,
                        step=step, path=str(path), cached=cached,
                        measured_in=profile["cost"].get("measured_in", "profile"),
                        table=profiling.profile_rows(profile))
        return {"profile_path": str(path)}

    def measure_profile(self, state_dir: Path) -> dict:
        model, manifest = self.ctx.states.load(state_dir)
        return profiling.profile_state(self.ctx, model, manifest)

    def built_profile(self, state_dir: Path) -> dict | None:
        model, _ = self.ctx.states.load(state_dir)  # cached: the next build starts from it
        return profiling.profile_from_build(model, state_dir / PROFILE_FILE)

    # ---- plan ----------------------------------------------------------------------------------
    def plan(self, state: dict) -> dict:
        ctx = self.ctx
        iteration = state["iteration"] + 1
        context = self.planner_context(state, iteration)
        ctx.reporter.planning(iteration)
        with Stopwatch() as watch:
            result = ctx.planner.propose(context)
        ctx.trace.event(
            "plan", iteration=iteration, duration_s=watch.seconds, planner=result.planner,
            status=result.status, fallback=result.fallback, fallback_reason=result.fallback_reason,
            context=context.model_dump(),
            attempts=[a.model_dump() for a in result.attempts], proposal=result.proposal.model_dump(),
        )
        return {"iteration": iteration, "proposal": result.proposal.model_dump(),
                "planner_status": result.status,
                "budget": {"params": context.step_budget_params,
                           "fraction": context.step_budget_fraction, "scale": state["step_scale"]}}

    def planner_context(self, state: dict, iteration: int) -> PlannerContext:
        ctx = self.ctx
        profile = read_json(state["profile_path"])
        budget = self.step_budget(state)
        cuts = self.suggested_cuts(profile, budget)
        rows = [LayerRow(**row, mlp_cut=cut) for row, cut in zip(profiling.profile_rows(profile), cuts)]
        history = [StepRecord(**h["record"]) for h in state["history"]]
        return PlannerContext(
            iteration=iteration, num_layers=len(rows), current_sparsity=state["current"]["sparsity"],
            target_sparsity=ctx.options.target_sparsity, step_budget_params=budget,
            step_budget_fraction=budget / state["dense"]["prunable"],
            remaining_params=self.remaining(state), branches=ctx.options.branches,
            layers=rows, history=history, reflections=state["reflections"][-5:],
            rejected_layers=state["rejected_layers"], hidden_size=ctx.hidden_size, head_dim=ctx.head_dim,
            pruners=profiling.available_pruners(profile),
        )

    def suggested_cuts(self, profile: dict, budget: int, sizing: str = "l2") -> list[int]:
        dense_channels = self.ctx.base.model.config.intermediate_size
        return suggested_mlp_cuts(profile, budget, self.ctx.hidden_size, dense_channels, sizing)

    def step_budget(self, state: dict) -> int:
        """This step's budget in prunable parameters; a remainder under half a step joins this one
        instead of costing an iteration of its own."""
        dense = state["dense"]
        fraction = self.ctx.options.step_fraction or DEFAULT_STEP_LAYERS / dense["layers"]
        step, remaining = fraction * dense["prunable"] * state["step_scale"], self.remaining(state)
        return max(1, int(remaining if remaining < (1 + ABSORBED_REMAINDER) * step else step))

    def remaining(self, state: dict) -> int:
        """Prunable parameters still to remove to reach the target (rounded down: the planner's limit
        and the build's are the same integer)."""
        left = self.ctx.options.target_sparsity - state["current"]["sparsity"]
        return int(left * state["dense"]["prunable"])

    # ---- build ---------------------------------------------------------------------------------
    def build(self, state: dict) -> dict:
        ctx = self.ctx
        iteration = state["iteration"]
        proposal = Proposal.model_validate(state["proposal"])
        profile = read_json(state["profile_path"])
        sizes = self.current_sizes(state)
        budget, remaining = state["budget"]["params"], self.remaining(state)
        reaches_target = budget >= remaining  # step_budget gave this step the whole remainder
        plans = {}
        if proposal.depth is not None:
            layers = size_depth(proposal.depth, sizes, budget, limit=remaining)
            if layers:
                plans["depth"] = [{"kind": "remove_layers", "layers": layers}]
                # Width matches depth: a same-size comparison. The step that reaches the target is
                # the exception: width takes the whole remainder even where depth removes less (layers
                # thinned by earlier steps are smaller than the budget), so that no sliver of a step
                # is left for one more iteration; a width candidate that wins while removing more is
                # the better step all the same.
                if not reaches_target:
                    budget = max(1, sum(sizes[i].params for i in layers))
        if proposal.width is not None:
            plans.update(self.width_plans(proposal.width, profile, sizes, budget, state["budget"]["params"]))
        pruner = proposal.width.pruner if proposal.width is not None else "l2"
        branches = list(plans)
        targets = [ctx.run_dir / "candidates" / f"iter-{iteration:04d}" / branch for branch in branches]
        current, profile_path = state["current"]["dir"], state["profile_path"]
        # Each candidate's refit walk measures its profile for the next iteration, unless none follows.
        jobs = [{"current": current, "actions": plans[branch], "profile": profile_path, "target": str(target),
                 "pruner": pruner, "measure": not reaches_target}
                for branch, target in zip(branches, targets)]
        built = ctx.workers.run("build", jobs, lambda i: ctx.reporter.building(iteration, branches[i]))
        candidates = []
        for branch, target, (info, figures) in zip(branches, targets, built):
            actions = plans[branch]
            if "invalid" in info:
                ctx.trace.event("candidate_invalid", iteration=iteration, branch=branch,
                                actions=actions, error=info["invalid"])
                continue
            info = {"branch": branch, "dir": str(target), "actions": actions, **info}
            ctx.trace.event("candidate_built", iteration=iteration, **figures, **info)
            candidates.append(info)
        return {"candidates": candidates}

    def width_plans(self, width: WidthProposal, profile: dict, sizes: list[LayerSize], budget: int,
                    step_budget: int) -> dict[str, list[dict]]:
        """Branch -> actions of the width candidates: ``width`` as proposed, and ``width-SCORE`` for each
        of the run's alternative sizings (a plan equal to an earlier one is not built twice)."""
        variants = [("width", self.shaped_proposal(width, self.suggested_cuts(profile, step_budget)))]
        for sizing in self.ctx.options.alternative_sizings:
            cuts = self.suggested_cuts(profile, step_budget, sizing)
            if sum(cuts):
                shares = width.model_copy(update={"layers": [], "mlp_shares": [float(c) for c in cuts]})
                variants.append((f"width-{sizing}", self.shaped_proposal(shares, cuts)))
        plans: dict[str, list[dict]] = {}
        for branch, proposal in variants:
            sized = self.serving_shape(size_width(proposal, sizes, budget, self.ctx.hidden_size,
                                                  self.ctx.head_dim), sizes)
            actions = [{"kind": "prune_width", "layer": i, **counts} for i, counts in sized.items()]
            if actions and actions not in plans.values():
                plans[branch] = actions
        return plans

    def current_sizes(self, state: dict) -> list[LayerSize]:
        """The current step's layer sizes. No reference to its model outlives the call: the builder
        releases it from the state cache before each candidate's refit."""
        model, _ = self.ctx.states.load(Path(state["current"]["dir"]))
        return [LayerSize(**s) for s in profiling.layer_sizes(model)]

    def shaped_proposal(self, width: WidthProposal, cuts: list[int]) -> WidthProposal:
        """The width proposal the candidate is sized from: suggested amounts where the planner gave
        none; with ``uniform_width``, every layer and no attention cut (heads stay uniform)."""
        if self.ctx.options.uniform_width:
            return width.model_copy(update={"layers": [], "mlp_share": 1.0, "mlp_shares": None})
        return with_suggested_shares(width, cuts)

    def serving_shape(self, plan: dict[int, dict[str, int]], sizes: list[LayerSize]) -> dict:
        """``plan`` with its MLP cuts moved to the run's serving shape (``--width-multiple``,
        ``--uniform-width``)."""
        options = self.ctx.options
        if options.width_multiple <= 1 and not options.uniform_width:
            return plan
        cuts = shape_mlp_cuts({i: p["mlp_channels"] for i, p in plan.items() if p["mlp_channels"]}, sizes,
                              options.width_multiple, options.uniform_width)
        shaped = {i: {"mlp_channels": cuts.get(i, 0), "kv_groups": plan.get(i, {}).get("kv_groups", 0)}
                  for i in sorted(set(plan) | set(cuts))}
        return {i: p for i, p in shaped.items() if p["mlp_channels"] or p["kv_groups"]}

    # ---- evaluate ------------------------------------------------------------------------------
    def evaluate(self, state: dict) -> dict:
        ctx = self.ctx
        ctx.states.release()  # scoring's peak is then the dense model and one candidate
        candidates = state["candidates"]
        gated_on = {"current_record": state["current"]["record"], "dense_record": state["dense"]["record"]}
        runs = ctx.workers.run("score", [{"candidate": c["dir"], **gated_on} for c in candidates],
                               lambda i: ctx.reporter.evaluating(state["iteration"], candidates[i]["branch"]))
        scored = []
        for candidate, (record_path, figures) in zip(candidates, runs):
            record = read_json(record_path)
            summary = decisions.headline(record)
            skipped = {"probes_skipped": record["probes_skipped"]} if record.get("probes_skipped") else {}
            ctx.trace.event("candidate_scored", iteration=state["iteration"], **figures,
                            branch=candidate["branch"], metrics=summary, **skipped)
            scored.append({**candidate, "record": record_path, "metrics": summary})
        return {"candidates": scored}

    # ---- decide --------------------------------------------------------------------------------
    def decide(self, state: dict) -> dict:
        ctx = self.ctx
        iteration = state["iteration"]
        current = read_json(state["current"]["record"])
        dense = read_json(state["dense"]["record"])
        records = {c["branch"]: read_json(c["record"]) for c in state["candidates"]}
        params = {c["branch"]: c["params"] for c in state["candidates"]}
        decision = decisions.decide(records, params, current, dense, ctx.options.gates,
                                    select_by=ctx.options.select_by)
        update: dict = {"decision": decision}
        if decision["accepted"]:
            chosen = next(c for c in state["candidates"] if c["branch"] == decision["branch"])
            step = state["current"]["step"] + 1
            step_dir, healed = ctx.steps.accept(step, Path(chosen["dir"]), decision, chosen,
                                                previous_sparsity=state["current"]["sparsity"])
            if healed:  # the step is the healed model: its signals are the ones to carry on
                chosen = {**chosen, "metrics": decisions.headline(read_json(step_dir / "signals.json"))}
            summary = f"{chosen['branch']}: " + decisions.describe_actions(chosen["actions"])
            record = StepRecord(iteration=iteration, branch=chosen["branch"], summary=summary,
                                pruner=chosen.get("pruner") if chosen["branch"] != "depth" else None,
                                sparsity=chosen["sparsity"], **decisions.history_metrics(chosen),
                                **decisions.rival_margin(decision))
            update.update(
                current={"step": step, "dir": str(step_dir), "sparsity": chosen["sparsity"],
                         "params": chosen["params"], "record": str(step_dir / "signals.json")},
                history=[*state["history"], {"step": step, "record": record.model_dump(),
                                             "candidate": chosen}],
                rejections=0, step_scale=1.0, rejected_layers=[],
            )
            ctx.trace.event("decision", iteration=iteration, step=step, **decision)
            if healed:
                ctx.trace.event("heal", iteration=iteration, step=step, **healed, metrics=chosen["metrics"])
        else:
            tried = [layer for c in state["candidates"] for a in c["actions"]
                     if a["kind"] == "remove_layers" for layer in a["layers"]]
            update.update(rejections=state["rejections"] + 1, step_scale=state["step_scale"] * 0.5,
                          rejected_layers=sorted(set(state["rejected_layers"]) | set(tried)))
            ctx.trace.event("decision", iteration=iteration, **decision)
            ctx.trace.event("rollback", iteration=iteration, to_step=state["current"]["step"],
                            reason=decision["reason"])
        merged = {**state, **update}
        update["status"] = self.stop_status(merged)
        ctx.reporter.decided(iteration, decision, merged)
        return update

    def stop_status(self, state: dict) -> str:
        options = self.ctx.options
        if state["current"]["sparsity"] >= options.target_sparsity - TARGET_TOLERANCE:
            return "target_reached"
        if state["iteration"] >= options.max_iterations:
            return "max_iterations"
        if state["rejections"] >= options.max_rejections:
            return "no_acceptable_step"
        return "running"

    # ---- reflect -------------------------------------------------------------------------------
    def reflect(self, state: dict) -> dict:
        ctx = self.ctx
        iteration = state["iteration"]
        failed = FailedStep(iteration=iteration, proposal=Proposal.model_validate(state["proposal"]),
                            outcome=state["decision"]["reason"],
                            candidates=[{k: c[k] for k in ("branch", "actions", "metrics") if k in c}
                                        for c in state["candidates"]])
        context = self.planner_context(state, iteration)
        with Stopwatch() as watch:
            result = ctx.planner.reflect(context, failed)
        lesson = result.reflection.lesson
        ctx.trace.event("reflection", iteration=iteration, duration_s=watch.seconds,
                        planner=result.planner, status=result.status, fallback=result.fallback,
                        fallback_reason=result.fallback_reason, lesson=lesson,
                        avoid_layers=result.reflection.avoid_layers,
                        attempts=[a.model_dump() for a in result.attempts])
        avoid = sorted(set(state["rejected_layers"]) | set(result.reflection.avoid_layers))
        return {"reflections": [*state["reflections"], f"iteration {iteration}: {lesson}"],
                "rejected_layers": avoid}

    # ---- finish --------------------------------------------------------------------------------
    def finish(self, state: dict) -> dict:
        ctx = self.ctx
        ctx.workers.close()  # the report needs none of them, and each holds a dense model
        with Stopwatch() as watch:
            final = ctx.final.finish()
        ctx.trace.event("finish", duration_s=watch.seconds, status=state["status"], **final)
        return {"final": final}

    # ---- routing -------------------------------------------------------------------------------
    def route_after_accept(self, state: dict) -> str:
        return "profile" if self.stop_status(state) == "running" else "finish"

    def route_after_decide(self, state: dict) -> str:
        if state["status"] != "running":
            return "finish"
        return "profile" if state["decision"]["accepted"] else "reflect"

    def route_after_reflect(self, state: dict) -> str:
        return "plan" if state["status"] == "running" else "finish"
