"""``agent_prune.prune(...)``: the ``agent-prune run`` loop from Python (notebooks, scripts).

It drives the very same machinery as the CLI (``start_run``: graph, trace, checkpoints, report,
final export), so a run started here can be inspected with ``agent-prune trace OUT`` and continued
with ``agent-prune resume OUT``. A model passed as an object is first saved as a plain Hugging Face
folder inside the run directory, because a run names its model by path (resume reloads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from agent_prune.errors import InputError

INPUT_MODEL_DIR = "input-model"


@dataclass
class PruneResult:
    """The best accepted state of the run (the dense model when no step was accepted)."""

    model: nn.Module
    tokenizer: Any
    manifest: Any
    summary: dict


def prune(model_or_path: nn.Module | str | Path, tokenizer=None, *, target_sparsity: float,
          planner: str = "heuristic", out: str | Path, data_dir: str | Path | None = None,
          reporter=None, **options: Any) -> PruneResult:
    """Prune to ``target_sparsity`` with ``planner``; the run directory is ``out``.

    ``options`` are further run options by their config-file names (``seqlen=256``,
    ``export_format="gguf"``, ``final_eval={"windows": 8}``; see ``agent-prune run --help``).
    """
    from pydantic import ValidationError

    from agent_prune.agent.options import RunOptions
    from agent_prune.agent.session import start_run
    from agent_prune.commands.config import validation_message

    run_dir = Path(out)
    model_spec = _model_spec(model_or_path, tokenizer, run_dir)
    values = {**options, "model": model_spec, "out": str(run_dir), "target_sparsity": target_sparsity,
              "planner": planner, "data_dir": None if data_dir is None else str(data_dir)}
    try:
        run_options = RunOptions.model_validate(values)
    except ValidationError as exc:
        raise InputError(validation_message(exc), "see agent-prune run --help for the options") from None
    summary = start_run(run_options, reporter=reporter)
    return _best_state(run_options, summary)


def _model_spec(model_or_path, tokenizer, run_dir: Path) -> str:
    if isinstance(model_or_path, (str, Path)):
        return str(model_or_path)
    if not isinstance(model_or_path, nn.Module):
        raise InputError(f"cannot prune a {type(model_or_path).__name__}",
                         "pass a transformers causal LM or a model path")
    if tokenizer is None:
        raise InputError("a model object needs its tokenizer", "pass tokenizer=...")
    from agent_prune.models.loading import save_dense

    folder = run_dir / INPUT_MODEL_DIR
    if not (folder / "config.json").is_file():  # a finished or resumed run keeps its copy
        folder.mkdir(parents=True, exist_ok=True)
        save_dense(model_or_path, tokenizer, folder)
    return str(folder)


def _best_state(options, summary: dict) -> PruneResult:
    from agent_prune.actions import dense_manifest
    from agent_prune.agent.resources import RunResources
    from agent_prune.agent.states import ModelStates

    states = ModelStates(RunResources(options))
    best = states.store.index().best
    base = states.resources.base
    if best is None:
        return PruneResult(base.model, base.tokenizer, dense_manifest(base.model), summary)
    model, manifest = states.load(states.store.step_dir(best))
    return PruneResult(model, base.tokenizer, manifest, summary)
