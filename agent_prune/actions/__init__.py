"""Pruning actions: schemas, selection from scores, surgery, masks, manifests and replay.

``apply_actions(model, actions, manifest)`` is the entry point; ``replay(base, manifest, tensors)``
rebuilds a pruned state from its base model (see ``manifest.py``). The action schemas import
without torch (planners use them); everything else loads on first use.
"""

from importlib import import_module

from agent_prune.actions.schema import (
    ACTION_TYPES,
    Action,
    MaskSparsity,
    PruneWidth,
    RemoveLayers,
    describe,
    parse_actions,
)

_LAZY = {
    "HANDLERS": "apply", "apply_actions": "apply",
    "MANIFEST_FILE": "manifest", "Manifest": "manifest", "dense_manifest": "manifest",
    "parse_manifest": "manifest", "replay": "manifest", "side_tensors": "manifest",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"agent_prune.actions.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'agent_prune.actions' has no attribute '{name}'")


__all__ = [
    "ACTION_TYPES",
    "Action",
    "MaskSparsity",
    "PruneWidth",
    "RemoveLayers",
    "describe",
    "parse_actions",
    *_LAZY,
]
