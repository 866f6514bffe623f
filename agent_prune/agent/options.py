"""Run options: everything a run needs, saved in ``RUN_DIR/run.json`` so ``resume`` can rebuild it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent_prune.agent.proposal import Sizing


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


REPORT_TASKS = ("wikitext2", "freebaseqa", "arc_easy")


class FinalEval(BaseModel):
    """The before/after protocol of the report (by default WikiText-2 *test*, FreebaseQA, ARC-Easy).

    ``tasks``: the report's evaluation tasks (``agent_prune.evaluation.task_names.TASKS``; the CLI's
    ``--report-tasks`` and the config key ``report_tasks`` set them together with ``speed``).
    ``arc_limit`` caps every multiple-choice task (ARC-Easy/Challenge, CSQA, MMLU), not only ARC.
    ``windows = 0`` skips the evaluation (``--no-final-eval``)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: list(REPORT_TASKS))
    windows: int = 32
    seqlen: int = 512
    freebaseqa_limit: int = 300
    arc_limit: int = 300
    speed: bool = True
    dtype: Literal["weights", "compute"] = Field(
        "weights", description="what the report's tasks multiply in. weights: the weights as stored and "
                               "exported (--dtype), figures comparable with other tools' float32 ones; "
                               "compute: the run's compute dtype, on a copy as the candidates are scored "
                               "(agent_prune.models.precision.evaluated_in): with --compute-dtype "
                               "bfloat16 the report takes about half the time on a CPU with AVX512-BF16. "
                               "Speed is measured on the weights as stored either way. CLI "
                               "--report-dtype")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        from agent_prune.evaluation.task_names import TASKS

        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {', '.join(unknown)} (choose from {', '.join(TASKS)})")
        return list(dict.fromkeys(value))


def report_task_settings(spec: str | list[str]) -> dict:
    """``final_eval`` fields from ``--report-tasks`` / ``report_tasks``: a comma list or a list of
    task names, where ``speed`` switches on the tokens/s measurement."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    return {"tasks": [t for t in names if t != "speed"], "speed": "speed" in names}


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
                                                    "parameters; default three layers' worth "
                                                    "(nodes.DEFAULT_STEP_LAYERS)")
    branches: list[Literal["depth", "width"]] = Field(default_factory=lambda: ["depth", "width"])
    select_by: Literal["perplexity", "kl"] = "perplexity"
    alternative_sizings: list[Sizing] = Field(
        default_factory=lambda: ["fluctuation"],
        description="for each, one more width candidate every step: the planner's pruner and step size "
                    "over every layer, each layer's MLP cut the profile's suggestion under this "
                    "score's global ranking (the planner's own shares default to l2's); the best "
                    "candidate on the paired selection signal is kept. Each costs a build and a "
                    "scoring a step; [] for one width candidate (docs/benchmarks.md, \"Sizing by "
                    "measurement\")")
    recovery: Literal["none", "reconstruct", "distill"] = Field(
        "reconstruct", description="reconstruct: refit each candidate's cut o_proj/down_proj toward the "
                                   "dense sub-block on its own inputs (agent_prune.recovery.reconstruct); "
                                   "distill: heal each accepted step; none: the cut alone")
    heal_tokens: int = Field(200_000, ge=0)
    heal_seconds: float = Field(1200.0, ge=0)
    eval_windows: int = Field(8, ge=2)
    probe_limit: int = Field(120, ge=4)
    kl_windows: int = Field(4, ge=0)
    seqlen: int = Field(512, ge=16)
    profile_gradients: bool = Field(
        False, description="gradient and Taylor metrics in each step's profile (the taylor pruner needs "
                           "them); off by default: the default pruner and the heuristic read forward "
                           "metrics only, and the backward pass doubles the profile's cost")
    profile_hessians: bool = Field(
        False, description="input Gram matrices of o_proj/down_proj in each step's profile (the obs "
                           "pruner's structured OBS scores need them; a few seconds a layer on CPU)")
    calib_samples: int = Field(128, ge=1, description="C4 windows of calib_seqlen tokens for the profile "
                                                        "and the reconstruction of each candidate")
    calib_seqlen: int = Field(128, ge=16, description="tokens per calibration window (seqlen is the "
                                                        "evaluation windows'): 128 windows of 128 tokens "
                                                        "come from four times as many documents as 32 of "
                                                        "512, and gave the refit lower test perplexity at "
                                                        "the same cost (docs/benchmarks.md, 'Shorter "
                                                        "calibration windows')")
    width_multiple: int = Field(1, ge=1, description="every thinned layer keeps a multiple of this many "
                                                      "MLP channels (e.g. 64, for aligned kernels)")
    uniform_width: bool = Field(False, description="width steps cut every layer to one common MLP width and "
                                                   "leave attention whole, so the export has a stock config "
                                                   "(vLLM, TensorRT-LLM and other engines without per-layer "
                                                   "widths load it); allocation across layers is given up")
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    device_map: Literal["auto"] | None = Field(
        None, description="auto: accelerate's infer_auto_device_map decides from max_memory whether the "
                          "model fits `device`; if not, the decoder layers of every model the run holds "
                          "stay off it (in RAM for a GPU run whose map stays there, else in safetensors "
                          "files under RUN_DIR/offload) and run on it one layer at a time "
                          "(agent_prune.models.placement). None: everything on `device`")
    max_memory: dict[str, str] | None = Field(
        None, description="caps per device in accelerate's keys and sizes, e.g. {cpu = \"300MiB\", 0 = "
                          "\"20GiB\"} (with device_map auto; default: what is free on the device and in RAM)")
    workers: int = Field(1, ge=1, description="processes that build and score a step's candidates side by "
                                              "side (agent_prune.agent.workers), each loading the model "
                                              "once; 1: the run's own process, one candidate after the "
                                              "other. Decisions and export do not depend on it")
    candidate_threads: int | None = Field(
        None, ge=1, description="torch CPU threads that build and score each candidate, in each worker "
                                "and in the run's own process with one worker; default the run "
                                "process's (every core). A refit's float sums round differently with "
                                "another thread count, so this, not `workers`, is part of what a run "
                                "computes; on CPU give workers x threads <= cores")
    worker_devices: list[str] | None = Field(
        None, description="one device per worker, e.g. [cuda:0, cuda:1]; default every worker on "
                          "`device`. All of `device`'s kind: a candidate's bits must not depend on "
                          "which worker built it")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="what the loop's forwards multiply in: its calibration walks (profile, "
                               "refit) under torch autocast, weights, residual stream and statistics "
                               "staying float32; its candidate scoring (validation windows, FreebaseQA "
                               "probes, KL) on a bfloat16 copy of each model, MLP widths padded with "
                               "zero channels to shared shapes. The report's evaluation uses it only "
                               "with final_eval.dtype compute; speed and export never. auto: bfloat16 "
                               "for float32 weights on a device with bfloat16 units (CPUs with "
                               "AVX512-BF16 or AMX, CUDA), else float32; resolved when the run starts "
                               "and saved in run.json. The shared model's demo on 2 cores: the same "
                               "decisions in 11 min 17 s against 13-14 min (2360 MiB peak against "
                               "1980); with final_eval.dtype compute and oneDNN's kernel cache capped, "
                               "8 min 40 s to 9 min 23 s at 2058-2092 MiB (agent_prune.models.precision; "
                               "docs/benchmarks.md, \"bfloat16 compute\", \"The report in bfloat16\")")
    export_format: Literal["hf", "gguf"] = "hf"
    export_quant: str | None = Field(None, description="GGUF tensor type; default the input GGUF's")
    gates: Gates = Field(default_factory=Gates)
    final_eval: FinalEval = Field(default_factory=FinalEval)

    @model_validator(mode="after")
    def _a_device_per_worker(self) -> RunOptions:
        devices = self.worker_devices
        if devices is None:
            return self
        if len(devices) != self.workers:
            raise ValueError(f"{len(devices)} worker devices for {self.workers} workers (give one each)")
        kind = self.device.split(":")[0]
        if any(d.split(":")[0] != kind for d in devices):
            raise ValueError(f"worker devices {devices} are not all of the run's device kind ({kind})")
        return self

    @model_validator(mode="after")
    def _caps_with_a_map(self) -> RunOptions:
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory caps devices for device_map auto (give --device-map auto)")
        return self

    @field_validator("max_memory")
    @classmethod
    def _readable_caps(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        from agent_prune.errors import InputError
        from agent_prune.models.placement import memory_caps

        if value is not None:
            try:
                memory_caps(value)
            except InputError as exc:
                raise ValueError(exc.one_line()) from None
        return value

    @field_validator("branches")
    @classmethod
    def _some_branch(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one branch (depth or width) is needed")
        return list(dict.fromkeys(value))
