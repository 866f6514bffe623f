"""A tiny model folder + tiny data directory + run options, for end-to-end loop tests."""

from __future__ import annotations

from pathlib import Path

from agent_prune.agent.options import RunOptions
from tests.conftest import save_tiny
from tests.tiny_data import write_data_dir


def tiny_run_options(tmp: Path, **overrides) -> RunOptions:
    model_dir = tmp / "model"
    if not model_dir.exists():
        save_tiny(model_dir, "llama", num_hidden_layers=6)
    data_dir = tmp / "data"
    if not data_dir.exists():
        write_data_dir(data_dir, questions=40)
    values = dict(
        model=str(model_dir), out=str(tmp / "run"), target_sparsity=0.3, data_dir=str(data_dir),
        seqlen=32, eval_windows=4, probe_limit=8, kl_windows=2, calib_samples=4, calib_seqlen=32,
        # One layer's worth a step, pinned: these runs stop, resume and roll back
        # between several steps of the 6-layer model.
        step_fraction=1 / 6,
        final_eval={"windows": 4, "seqlen": 32, "freebaseqa_limit": 8, "arc_limit": 8, "speed": True},
    )
    values["final_eval"] = {**values["final_eval"], **overrides.pop("final_eval", {})}
    values.update(overrides)
    return RunOptions.model_validate(values)
