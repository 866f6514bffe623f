"""One protocol for every result: replay the state, export it, load the export back, evaluate it.

Quality: WikiText-2 test perplexity, FreebaseQA (multiple-choice probe, LLM-KICK exact match, gold
log-likelihood) and ARC-Easy accuracy, all from :func:`agent_prune.evaluation.harness.run_tasks`
with their standard errors. Size: parameters (:func:`count_parameters`) and the export's
safetensors bytes. Speed is measured separately, all models of a target in one process.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from torch import nn

from agent_prune.actions import Manifest, dense_manifest, replay
from agent_prune.checkpoints.store import read_state_dir
from agent_prune.evaluation.harness import run_tasks
from agent_prune.models.accounting import count_parameters
from agent_prune.models.export import export_model, load_pretrained


class Protocol(BaseModel):
    seqlen: int = 512
    windows: int = 32
    freebaseqa: int = 300
    arc_easy: int = 300

    def describe(self) -> str:
        return (f"WikiText-2 raw test, seqlen {self.seqlen}, first {self.windows} windows; FreebaseQA dev, "
                f"first {self.freebaseqa} questions (MC: gold vs 3 distractors, seed 0; EM: LLM-KICK prompt, "
                f"greedy); ARC-Easy validation, first {self.arc_easy} items")


# Per-item vectors kept for paired comparisons between rows (same items for every model).
PAIRED = {"wikitext2": ("window_nll", False), "freebaseqa": ("mc_correct", True),
          "arc_easy": ("correct", True)}


def evaluate_model(model: nn.Module, tokenizer, data_dir: Path, protocol: Protocol) -> tuple[dict, dict]:
    """``(figures per task, per-item vectors per task)``."""
    results = {}
    for task, limit in (("wikitext2", None), ("freebaseqa", protocol.freebaseqa),
                        ("arc_easy", protocol.arc_easy)):
        results |= run_tasks(model, tokenizer, [task], data_dir, seqlen=protocol.seqlen,
                             windows=protocol.windows, limit=limit, per_item=True)
    items = {task: entry.pop("per_item") for task, entry in results.items()}
    items["freebaseqa"]["mc_correct"] = [float(m > 0) for m in items["freebaseqa"]["mc_margin"]]
    items["freebaseqa"].pop("output", None)
    return results, {task: items[task][key] for task, (key, _) in PAIRED.items()}


def export_state(base: nn.Module, tokenizer, state_dir: Path | None, export_dir: Path) -> dict:
    """Replay ``state_dir`` (None: the dense model) onto ``base`` and export it to ``export_dir``."""
    if state_dir is None:
        model, manifest = base, dense_manifest(base)
    else:
        manifest_json, tensors, _ = read_state_dir(Path(state_dir))
        manifest = Manifest.model_validate(manifest_json)
        model = replay(base, manifest, tensors)
    summary = export_model(model, tokenizer, export_dir, manifest)
    return {"export": str(export_dir), "file_bytes": summary.safetensors_bytes,
            "heterogeneous": summary.heterogeneous, "layers": len(manifest.layers)}


def evaluate_export(export_dir: Path, base_prunable: int, data_dir: Path, protocol: Protocol,
                    device: str = "cpu") -> tuple[dict, dict]:
    """Load the export the way a user would (:func:`load_pretrained`), move it to ``device``, evaluate it."""
    model, tokenizer = load_pretrained(export_dir)
    model.to(device)
    counts = count_parameters(model, base_prunable=base_prunable)
    tasks, items = evaluate_model(model, tokenizer, data_dir, protocol)
    return {"params": counts.total, "prunable": counts.prunable,
            "sparsity": round(counts.structural_sparsity, 6), "tasks": tasks}, items


def speed_of_exports(exports: dict[str, Path], device: str = "cpu") -> dict:
    """Prefill/decode tokens/s of several exports on ``device``, interleaved in this one process."""
    from agent_prune.evaluation.speed import measure_speed

    models = {name: load_pretrained(path)[0].to(device) for name, path in exports.items()}
    return measure_speed(models)
