"""Pruning actions: schemas, selection from scores, surgery, masks, manifests and replay.

``apply_actions(model, actions, manifest)`` is the entry point; ``replay(base, manifest, tensors)``
rebuilds a pruned state from its base model (see ``manifest.py``).
"""

from agent_prune.actions.apply import HANDLERS, apply_actions
from agent_prune.actions.manifest import (
    MANIFEST_FILE,
    Manifest,
    dense_manifest,
    parse_manifest,
    replay,
    side_tensors,
)
from agent_prune.actions.schema import (
    Action,
    MaskSparsity,
    PruneWidth,
    RemoveLayers,
    describe,
    parse_actions,
)

__all__ = [
    "HANDLERS",
    "MANIFEST_FILE",
    "Action",
    "Manifest",
    "MaskSparsity",
    "PruneWidth",
    "RemoveLayers",
    "apply_actions",
    "dense_manifest",
    "describe",
    "parse_actions",
    "parse_manifest",
    "replay",
    "side_tensors",
]
