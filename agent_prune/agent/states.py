"""Pruned states: a manifest and side tensors on disk (accepted steps in the checkpoint store,
candidates in their folders), replayed onto the base model, with few replayed models kept."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from torch import nn

from agent_prune.actions import Manifest
from agent_prune.agent.resources import RunResources
from agent_prune.checkpoints.store import CheckpointStore, read_state_dir, write_state_dir


def save_state(target: Path, model: nn.Module, manifest: Manifest, record: dict,
               extra: dict[str, dict] | None = None) -> None:
    """Write ``model`` as a state folder: its manifest, the tensors replay cannot rebuild, ``record``
    and ``extra`` JSON files."""
    from agent_prune.actions import side_tensors

    write_state_dir(target, manifest.model_dump(mode="json"), side_tensors(model, manifest), record, extra)


class ModelStates:
    # Replayed states kept in memory: the current step, which profile, build and the rebuild after a
    # rollback all read. Candidates are not kept (each is scored once, then replayed bit for bit if
    # accepted): holding them put up to four pruned copies beside the dense model (issue 16).
    MODEL_CACHE = 1

    def __init__(self, resources: RunResources):
        self.resources = resources
        self.store = CheckpointStore(resources.run_dir / "checkpoints")
        self._models: OrderedDict[str, tuple[nn.Module, Manifest]] = OrderedDict()

    def load(self, state_dir: Path) -> tuple[nn.Module, Manifest]:
        """(model, manifest) of a saved state, replayed onto the base model and cached."""
        key = str(Path(state_dir).resolve())
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model, manifest = self.replay(state_dir)
        self.remember(state_dir, model, manifest)
        return model, manifest

    def replay(self, state_dir: Path) -> tuple[nn.Module, Manifest]:
        """(model, manifest) of a saved state, freshly replayed and not cached: the caller owns it.

        Replay equals the saved model bit for bit (``actions.replay``), so a candidate scored from
        its replay scores as the model that was built."""
        from agent_prune.actions import replay

        manifest_json, tensors, _ = read_state_dir(Path(state_dir))
        manifest = Manifest.model_validate(manifest_json)
        return replay(self.resources.base.model, manifest, tensors).eval(), manifest

    def remember(self, state_dir: Path, model: nn.Module, manifest: Manifest) -> None:
        """Keep ``model`` as the replay of ``state_dir`` (a healed step is not rebuilt from disk)."""
        self._models[str(Path(state_dir).resolve())] = (model, manifest)
        while len(self._models) > self.MODEL_CACHE:
            self._models.popitem(last=False)

    def release(self) -> None:
        """Drop the cached step models (the evaluate node scores candidates without them; a rollback
        replays the current step again, which costs seconds against minutes of scoring)."""
        self._models.clear()
