"""What a planner sees (``PlannerContext``) and what it may answer (``Proposal``, ``Reflection``).

Everything here is JSON data: planners never touch tensors, and their replies are validated
against the context (layers exist, protected layers untouched, budgets respected) before the loop
acts on them. Layer indices are the *current* model's numbering, the one the profile table shows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class LayerRow(BaseModel):
    """One row of the compact profile table shown to a planner."""

    index: int
    source: int
    params: int
    heads: int
    kv_heads: int
    mlp_channels: int
    protected: bool = False
    z: dict[str, float] = Field(default_factory=dict)  # metric -> z-score across layers
    mlp_cut: int = Field(0, description="MLP channels this layer would give up if the whole step "
                                        "budget went to MLP channels ranked across layers "
                                        "(agent.allocation); the suggested per-layer amounts")


class StepRecord(BaseModel):
    """An accepted step, as the planner sees it in the history."""

    iteration: int
    branch: str
    summary: str
    sparsity: float
    perplexity: float
    probe_accuracy: float | None = None
    pruner: str | None = None  # width steps: the pruner that chose the structures
    rival: str | None = Field(None, description="the closest other candidate of this step (None: it "
                                                "had one)")
    rival_z: float | None = Field(None, description="how many standard errors the kept candidate was "
                                                    "ahead of the rival on the paired selection signal "
                                                    "(negative: kept behind it, by the gates)")
    leads: dict[str, float] = Field(default_factory=dict,
                                    description="the same lead over every other candidate of the step")

    def rival_leads(self) -> dict[str, float]:
        """The lead over each rival (records written before ``leads`` existed give their one rival)."""
        if self.leads or self.rival is None or self.rival_z is None:
            return dict(self.leads)
        return {self.rival: self.rival_z}


class PlannerContext(BaseModel):
    iteration: int
    num_layers: int
    current_sparsity: float
    target_sparsity: float
    step_budget_params: int
    step_budget_fraction: float  # of the base model's prunable parameters
    remaining_params: int | None = Field(
        None, description="prunable parameters still to remove to reach the target: depth never "
                          "removes more (None: no limit)")
    branches: list[Literal["depth", "width"]] = Field(default_factory=lambda: ["depth", "width"])
    layers: list[LayerRow]
    history: list[StepRecord] = Field(default_factory=list)
    reflections: list[str] = Field(default_factory=list)
    rejected_layers: list[int] = Field(default_factory=list)  # tried and rolled back this round
    hidden_size: int | None = None  # lets planners check a width proposal against the step budget
    head_dim: int | None = None
    pruners: list[str] = Field(default_factory=lambda: list(DEFAULT_PRUNERS),
                               description="the width pruners whose scores this step's profile holds")

    def layer(self, index: int) -> LayerRow:
        return self.layers[index]


class DepthProposal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(description="current layer indices to remove, most expendable first")

    @field_validator("layers")
    @classmethod
    def _once_each(cls, value: list[int]) -> list[int]:
        # A layer named twice is removed once: small planner models loop on a number, and refusing
        # the reply for it cost 6 of 9 replies of the 135M planner (docs/benchmarks.md).
        return list(dict.fromkeys(value))


Pruner = Literal["l2", "amp", "fluctuation", "obs", "taylor"]
PRUNERS: dict[str, str] = {
    "l2": "||X_j||_2 * ||W_out[:, j]||_2 (Wanda-sp with L2 norms): the size of what a channel or head "
          "writes to the residual stream; the default",
    "amp": "mean over tokens of |X_j| * ||W_out[:, j]||_1 (AMP, the MoP width pruner)",
    "fluctuation": "Var(X_j) * ||W_out[:, j]||_2^2 (FLAP): what varies from token to token; the removed "
                   "channels' mean output is kept as a bias",
    "obs": "the output error left after refitting the kept channels (structured OBS, from the input "
           "Hessian); needs hessians in the profile",
    "taylor": "|W * dL/dW| summed over the weights a structure owns (LLM-Pruner); needs gradients",
}
# what a profile without gradients or hessians offers
DEFAULT_PRUNERS = ["l2", "amp", "fluctuation"]
# Scores whose standardised global ranking can size a width step's per-layer cuts (agent.allocation).
Sizing = Literal["l2", "fluctuation"]


class WidthProposal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(description="current layer indices to thin; empty means every layer")
    mlp_share: float = Field(1.0, ge=0.0, le=1.0,
                             description="share of the step budget taken from MLP channels; "
                                         "the rest from attention KV groups")
    pruner: Pruner = Field("l2", description="the importance score that picks which channels and "
                                             "heads go inside each layer")
    mlp_shares: list[float] | None = Field(
        None, description="relative amount of the MLP cut for each entry of layers (same order); "
                          "omitted or empty: the profile's suggestion (LayerRow.mlp_cut), or an "
                          "even split where it suggests nothing for these layers")

    @field_validator("mlp_shares", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == [] else value

    @model_validator(mode="after")
    def _merge_repeats(self):
        """A layer named twice is thinned once, by the sum of its shares (as DepthProposal)."""
        if len(set(self.layers)) == len(self.layers):
            return self
        if self.mlp_shares is None:
            self.layers = list(dict.fromkeys(self.layers))
            return self
        if len(self.mlp_shares) != len(self.layers):
            return self  # validate_proposal refuses the share count as it was written
        merged: dict[int, float] = {}
        for layer, share in zip(self.layers, self.mlp_shares):
            merged[layer] = merged.get(layer, 0.0) + share
        self.layers, self.mlp_shares = list(merged), list(merged.values())
        return self


class Proposal(BaseModel):
    """The planner's next step: a depth and/or a width candidate, with its reasoning."""

    model_config = ConfigDict(extra="forbid")

    rationale: str = Field(description="why these layers, in one or two sentences")
    depth: DepthProposal | None = None
    width: WidthProposal | None = None


class Reflection(BaseModel):
    """What the planner learned from a rejected step; shown back to it next time."""

    model_config = ConfigDict(extra="forbid")

    lesson: str = Field(description="what went wrong and what to try instead, in one or two sentences")
    avoid_layers: list[int] = Field(default_factory=list)


def validate_proposal(proposal: Proposal, context: PlannerContext) -> list[str]:
    """Problems that make ``proposal`` unusable in ``context`` (empty list = valid)."""
    problems: list[str] = []
    if proposal.depth is None and proposal.width is None:
        problems.append("propose at least one of 'depth' or 'width'")
    n = context.num_layers
    protected = {row.index for row in context.layers if row.protected}
    if proposal.depth is not None:
        if "depth" not in context.branches:
            problems.append("the depth branch is not allowed in this run")
        layers = proposal.depth.layers
        if not layers:
            problems.append("depth.layers is empty")
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            problems.append(f"depth.layers {bad} do not exist (valid: 0..{n - 1})")
        if set(layers) & protected:
            problems.append(f"depth.layers {sorted(set(layers) & protected)} are protected")
        if set(layers) & set(context.rejected_layers):
            problems.append(f"depth.layers {sorted(set(layers) & set(context.rejected_layers))} were "
                            "just rolled back; choose other layers")
        if len(set(layers)) >= n:
            problems.append("depth.layers would remove every layer")
    if proposal.width is not None:
        if "width" not in context.branches:
            problems.append("the width branch is not allowed in this run")
        bad = [i for i in proposal.width.layers if not 0 <= i < n]
        if bad:
            problems.append(f"width.layers {bad} do not exist (valid: 0..{n - 1})")
        if proposal.width.pruner not in context.pruners:
            problems.append(f"width.pruner '{proposal.width.pruner}' has no scores in this run's "
                            f"profile; use one of {', '.join(context.pruners)}")
        shares = proposal.width.mlp_shares
        if shares is not None and (len(shares) != len(proposal.width.layers) or not proposal.width.layers):
            problems.append(f"width.mlp_shares has {len(shares)} entries; give one per entry of "
                            f"width.layers ({len(proposal.width.layers)})")
        elif shares is not None and (min(shares) < 0 or sum(shares) <= 0):
            problems.append("width.mlp_shares must be non-negative with a positive sum")
    return problems


def validate_reflection(reflection: Reflection, context: PlannerContext) -> list[str]:
    """Problems that make ``reflection`` unusable in ``context`` (empty list = valid)."""
    problems: list[str] = []
    if not reflection.lesson.strip():
        problems.append("lesson is empty")
    n = context.num_layers
    bad = [i for i in reflection.avoid_layers if not 0 <= i < n]
    if bad:
        problems.append(f"avoid_layers {bad} do not exist (valid: 0..{n - 1})")
    return problems
