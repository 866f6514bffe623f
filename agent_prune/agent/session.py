"""Start or resume a run: validate inputs before touching disk, then drive the graph."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from agent_prune import __version__
from agent_prune.agent.options import RunOptions
from agent_prune.agent.reporter import Reporter
from agent_prune.agent.resources import planner_settings
from agent_prune.agent.runtime import RunContext
from agent_prune.data.corpora import C4_FILE, WIKITEXT_FILES
from agent_prune.data.sources import check_jsonl_files, resolve_data_dir
from agent_prune.data.tasks import FREEBASEQA_FILE, MC_FILES
from agent_prune.errors import InputError
from agent_prune.io import atomic_write_json, read_json
from agent_prune.models.formats import check_exportable
from agent_prune.models.loading import resolve_device, resolve_model_source

RUN_FILE = "run.json"
STATE_FILE = "state.sqlite"  # written by agent.graph.open_checkpointer
# The local data files a run reads (loop signals, calibration and the final evaluation)
RUN_DATA_FILES = (*WIKITEXT_FILES.values(), C4_FILE, FREEBASEQA_FILE, MC_FILES["arc_easy"])
RESTART_HINT = "restore it from a backup, or start again with 'agent-prune run --out' another directory"


def start_run(options: RunOptions, reporter: Reporter | None = None) -> dict:
    run_dir = Path(options.out)
    if (run_dir / RUN_FILE).is_file():
        raise InputError(f"{run_dir} already holds a run",
                         f"continue it with 'agent-prune resume {run_dir}', or pick another --out")
    # Fail on bad input before anything is written.
    resolve_model_source(options.model)
    for device in [options.device, *(options.worker_devices or [])]:
        resolve_device(device)
    check_jsonl_files(resolve_data_dir(options.data_dir), RUN_DATA_FILES)
    check_exportable(options.model, options.export_format, options.export_quant)
    from agent_prune.agent.planners.spec import make_planner

    make_planner(options.planner, **planner_settings(options))  # a bad spec or option fails here
    options = settle_compute_dtype(options, (reporter or Reporter()).warn)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_FILE, {
        "agent_prune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": options.model_dump(),
    })
    return _drive(RunContext(options, reporter), resume=False)


def settle_compute_dtype(options: RunOptions, warn) -> RunOptions:
    """``options`` with ``auto`` resolved, as run.json keeps it (a resume elsewhere multiplies as the
    run began); ``warn`` is told when bfloat16 was asked for where the device only emulates it."""
    from agent_prune.models.precision import native_bfloat16, resolve_compute_dtype

    settled = resolve_compute_dtype(options.compute_dtype, options.device, options.dtype)
    if settled == "bfloat16" and not native_bfloat16(options.device):
        warn(f"--compute-dtype bfloat16 on {options.device}, which has no bfloat16 units (AVX512-BF16 or "
             "AMX on CPU): torch emulates it, slower than float32; use --compute-dtype auto or float32")
    return options.model_copy(update={"compute_dtype": settled})


def resume_run(run_dir: str, reporter: Reporter | None = None) -> dict:
    options = read_run_options(run_dir)
    check_run_state(Path(run_dir))
    return _drive(RunContext(options, reporter), resume=True)


def read_run_options(run_dir: str | Path) -> RunOptions:
    """The options a run was started with, from ``RUN_DIR/run.json``; a bad file is an InputError."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} is not a run directory (no {RUN_FILE})",
                         "pass the directory given to 'agent-prune run --out'")
    try:
        saved = read_json(path)["options"]
        # runs started before calib_seqlen existed calibrated on windows of seqlen tokens: a resume
        # keeps their windows (the refit of later steps assumes the earlier steps' windows)
        saved.setdefault("calib_seqlen", saved.get("seqlen", 512))
        saved.setdefault("compute_dtype", "float32")  # and before compute_dtype, in float32
        return RunOptions.model_validate(saved)
    # JSONDecodeError and ValidationError are ValueErrors; AttributeError: options that are not a table
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{path} is corrupt (not the JSON that 'agent-prune run' writes)",
                         RESTART_HINT) from None


def check_run_state(run_dir: Path) -> None:
    """The graph's checkpoints (``state.sqlite``) are there and readable, before anything is written."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        # state.sqlite is opened before the first trace record: a run without either never started.
        if (run_dir / "trace.jsonl").is_file():
            raise InputError(f"{path} is missing, so the run cannot continue where it stopped",
                             RESTART_HINT)
        return
    try:
        # Not read-only: a killed run leaves a write-ahead log that only a writer may fold back in.
        with contextlib.closing(sqlite3.connect(path)) as db:
            healthy = db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError:
        healthy = False
    if not healthy:
        raise InputError(f"{path} is corrupt (not a readable SQLite database)", RESTART_HINT)


def _drive(ctx: RunContext, resume: bool) -> dict:
    from agent_prune.agent.graph import run_graph
    from agent_prune.reporting.report import write_report

    state = run_graph(ctx, resume=resume)
    summary = run_summary(state, ctx.options)
    if state.get("final"):
        summary["report"] = str(write_report(ctx.run_dir, summary))
    atomic_write_json(ctx.run_dir / "summary.json", summary)
    return summary


def run_summary(state: dict, options: RunOptions) -> dict:
    current = state.get("current", {})
    history = state.get("history", [])
    dense_signals = read_json(state["dense"]["record"]) if state.get("dense") else None
    points = [{"sparsity": 0.0, **_signals(dense_signals)}] if dense_signals else []
    points += [{"sparsity": h["candidate"]["sparsity"], **h["candidate"].get("metrics", {})}
               for h in history]
    return {
        "status": state.get("status"),
        "run_dir": options.out,
        "options": options.model_dump(),
        "iterations": state.get("iteration", 0),
        "accepted_steps": len(history),
        "sparsity": current.get("sparsity", 0.0),
        "params": current.get("params"),
        "dense_params": state.get("dense", {}).get("params"),
        "steps": [{"step": h["step"], "iteration": h["record"]["iteration"],
                   "branch": h["record"]["branch"], "summary": h["record"]["summary"],
                   "sparsity": h["record"]["sparsity"], "metrics": h["candidate"].get("metrics", {})}
                  for h in history],
        "quality_points": points,
        "layer_map": state.get("final", {}).get("layer_map"),
        "final": state.get("final", {}),
    }


def _signals(record: dict) -> dict:
    return {k: record[k] for k in ("perplexity", "mc_accuracy", "mc_margin", "kl") if record.get(k)}
