"""Run options: everything a run needs, saved in ``RUN_DIR/run.json`` so ``resume`` can rebuild it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Gates(BaseModel):
    """Thresholds a step must pass to be accepted (relative increases; None disables a gate).

    A gate is crossed only when the paired difference is beyond the threshold by more than
    ``z`` standard errors, so noise alone never rolls a step back (see README, "Signals").
    """

    model_config = ConfigDict(extra="forbid")

    max_step_ppl_increase: float | None = Field(0.5, ge=0)
    max_total_ppl_increase: float | None = Field(None, ge=0)
    min_probe_accuracy_ratio: float | None = Field(None, ge=0, le=1)
    z: float = Field(2.0, ge=0)


class FinalEval(BaseModel):
    """The before/after protocol of the report (WikiText-2 *test*, FreebaseQA, ARC-Easy)."""

    model_config = ConfigDict(extra="forbid")

    windows: int = 32
    seqlen: int = 512
    freebaseqa_limit: int = 300
    arc_limit: int = 300
    speed: bool = True


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    out: str
    target_sparsity: float = Field(gt=0.0, lt=1.0)
    planner: str = "heuristic"
    planner_base_url: str | None = None
    planner_timeout: float = Field(120.0, gt=0)
    planner_options: dict[str, Any] = Field(
        default_factory=dict,
        description="further planner settings (agent_prune.agent.planners.spec.PlannerOptions)")
    max_iterations: int = Field(40, ge=1)
    max_rejections: int = Field(3, ge=1)
    step_fraction: float | None = Field(None, gt=0.0, lt=1.0,
                                        description="step budget as a fraction of base prunable "
                                                    "parameters; default one layer's worth")
    branches: list[Literal["depth", "width"]] = Field(default_factory=lambda: ["depth", "width"])
    select_by: Literal["perplexity", "kl"] = "perplexity"
    recovery: Literal["none", "reconstruct", "distill"] = "none"
    heal_tokens: int = Field(200_000, ge=0)
    heal_seconds: float = Field(1200.0, ge=0)
    eval_windows: int = Field(8, ge=2)
    probe_limit: int = Field(120, ge=4)
    kl_windows: int = Field(4, ge=0)
    seqlen: int = Field(512, ge=16)
    calib_samples: int = Field(16, ge=1)
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    export_format: Literal["hf", "gguf"] = "hf"
    export_quant: str | None = Field(None, description="GGUF tensor type; default the input GGUF's")
    gates: Gates = Field(default_factory=Gates)
    final_eval: FinalEval = Field(default_factory=FinalEval)

    @field_validator("branches")
    @classmethod
    def _some_branch(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one branch (depth or width) is needed")
        return list(dict.fromkeys(value))
