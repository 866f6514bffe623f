"""Accepted pruning steps on disk, each replayable onto the base model.

Layout under ``RUN_DIR/checkpoints``::

    index.json                 {"steps": [0, 1, ...], "last_good": k, "best": k}
    step-0003/manifest.json    the pruning manifest (original indices of what survives)
    step-0003/tensors.safetensors   side tensors replay needs (masks, refit weights), if any
    step-0003/record.json      metrics and the decision that accepted the step

A step directory is written under a temporary name and renamed into place, and ``index.json`` is
replaced atomically after it, so a crash at any moment leaves either the old or the new state.
``last_good`` is the newest accepted step (rollback target); ``best`` is the accepted step with the
highest structural sparsity (ties: the newest), which is what a run exports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from agent_prune.io import atomic_write_json, read_json

TENSORS_FILE = "tensors.safetensors"


class StoreIndex(BaseModel):
    steps: list[int] = Field(default_factory=list)
    last_good: int | None = None
    best: int | None = None
    sparsity: dict[int, float] = Field(default_factory=dict)


class CheckpointStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:04d}"

    def index(self) -> StoreIndex:
        path = self.root / "index.json"
        return StoreIndex.model_validate(read_json(path)) if path.is_file() else StoreIndex()

    def commit(self, step: int, manifest: dict, tensors: dict[str, torch.Tensor], record: dict,
               sparsity: float, extra: dict[str, dict] | None = None) -> Path:
        """Write step ``step`` and make it the last good one (idempotent: a rerun overwrites it)."""
        write_state_dir(self.step_dir(step), manifest, tensors, record, extra)
        index = self.index()
        if step not in index.steps:
            index.steps.append(step)
        index.sparsity[step] = sparsity
        index.last_good = step
        index.best = max(index.steps, key=lambda s: (round(index.sparsity.get(s, 0.0), 9), s))
        atomic_write_json(self.root / "index.json", index.model_dump())
        return self.step_dir(step)

    def load(self, step: int) -> tuple[dict, dict[str, torch.Tensor], dict]:
        return read_state_dir(self.step_dir(step))


def write_state_dir(target: Path, manifest: dict, tensors: dict[str, torch.Tensor], record: dict,
                    extra: dict[str, dict] | None = None) -> None:
    """Write a manifest (+ side tensors + record + extra JSON files) as one directory, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        atomic_write_json(tmp / "manifest.json", manifest)
        atomic_write_json(tmp / "record.json", record)
        for name, payload in (extra or {}).items():
            atomic_write_json(tmp / name, payload)
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / TENSORS_FILE))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_state_dir(source: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    tensors_path = source / TENSORS_FILE
    tensors = load_file(str(tensors_path)) if tensors_path.is_file() else {}
    return read_json(source / "manifest.json"), tensors, read_json(source / "record.json")
