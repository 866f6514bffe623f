"""What every piece of a run shares: its options, trace and reporter, and what is built on first use
(the base model, the data folder, the planner, the calibration windows)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from agent_prune.agent.options import RunOptions
from agent_prune.agent.reporter import Reporter
from agent_prune.agent.trace import TraceWriter
from agent_prune.errors import InputError


def planner_settings(options: RunOptions) -> dict:
    """The run options that configure the planner, as ``make_planner`` keywords."""
    clash = {"base_url", "timeout_s"} & set(options.planner_options)
    if clash:
        raise InputError(f"planner option {sorted(clash)[0]} has its own setting",
                         "use --planner-base-url / --planner-timeout (planner_base_url / "
                         "planner_timeout in a config file)")
    settings = {**options.planner_options, "timeout_s": options.planner_timeout}
    if options.planner_base_url:
        settings["base_url"] = options.planner_base_url
    return settings


def check_offloadable(options: RunOptions, where: str) -> None:
    """Refuse what cannot run with the decoder layers offloaded (to ``where``) rather than load the
    model whole for it."""
    if options.recovery == "distill":
        raise InputError(f"the model does not fit {options.device} (its layers go to {where}), and "
                         "distillation healing trains all layers at once",
                         "use --recovery reconstruct or none, or raise --max-memory")
    if options.export_format == "gguf":
        raise InputError(f"the model does not fit {options.device} (its layers go to {where}), and the GGUF "
                         "export needs it whole", "export hf, or raise --max-memory")


class RunResources:
    def __init__(self, options: RunOptions, reporter: Reporter | None = None):
        self.options = options
        self.run_dir = Path(options.out)
        self.reporter = reporter or Reporter()
        self.trace = TraceWriter(self.run_dir / "trace.jsonl")

    # Built on first use: resume, export and the Python API open a run without all of them.
    @cached_property
    def base(self):
        from agent_prune.models.loading import OffloadRequest, load_model
        from agent_prune.models.mapped import keep_unmapped
        from agent_prune.models.offload_homes import spill_folder

        o = self.options
        self.reporter.finishing("loading model")
        offload = None
        if o.device_map is not None:
            offload = OffloadRequest(o.max_memory, spill_folder(self.run_dir / "offload"))
        loaded = load_model(o.model, device=o.device, dtype=o.dtype, offload=offload)
        if loaded.offload is not None:
            check_offloadable(o, loaded.offload)
        # Read in bursts (replays, one layer a walk step, the report): between them its weights' file
        # pages leave the resident set at every trim (heap.release_memory) and stay in the page cache.
        keep_unmapped(loaded.model)
        return loaded

    @cached_property
    def data_dir(self):
        from agent_prune.data.sources import resolve_data_dir

        return resolve_data_dir(self.options.data_dir)

    @cached_property
    def planner(self):
        from agent_prune.agent.planners.spec import make_planner

        return make_planner(self.options.planner, notify=self.reporter.warn,
                            **planner_settings(self.options))

    @cached_property
    def calibration(self):
        """C4 windows for profiling and reconstruction (seeded; never an evaluation split)."""
        from agent_prune.data.corpora import c4_documents, calibration_windows

        docs = c4_documents(self.data_dir)
        return calibration_windows(self.base.tokenizer, docs, self.options.calib_samples,
                                   self.options.calib_seqlen, seed=self.options.seed)

    @cached_property
    def compute_dtype(self) -> str:
        """What the loop's forwards multiply in: ``options.compute_dtype``, ``auto`` resolved (a run
        resolves it before it writes run.json, so this is the saved value)."""
        from agent_prune.models.precision import resolve_compute_dtype

        o = self.options
        return resolve_compute_dtype(o.compute_dtype, o.device, o.dtype)

    def computing(self):
        """The block in which the loop's forwards multiply in :attr:`compute_dtype` (profile, refit
        walks, scoring; never the report's evaluation)."""
        from agent_prune.models import precision

        return precision.compute_dtype(self.compute_dtype)

    @property
    def hidden_size(self) -> int:
        return self.base.adapter.hidden_size

    @property
    def head_dim(self) -> int:
        return self.base.adapter.head_dim
