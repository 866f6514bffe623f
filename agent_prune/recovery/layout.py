"""Which dense layer each pruned layer came from, and where recovery records what it overwrote.

Recovery takes either the pruning manifest (``agent_prune.actions.manifest.Manifest``: its
``layers[i].source`` is the original index of layer ``i``; ``mark_overridden`` records a module
whose weights were refit so checkpoints store them and replay restores them exactly) or, for a model
without one, the plain list of original indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ManifestLike(Protocol):
    layers: Sequence[Any]

    def mark_overridden(self, layer: int | None, module: str) -> str: ...


Layout = ManifestLike | Sequence[int]


def layer_sources(layout: Layout) -> list[int]:
    if isinstance(layout, ManifestLike):
        return [record.source for record in layout.layers]
    return [int(source) for source in layout]


def mark_overridden(layout: Layout | None, layer: int, module: str) -> None:
    """Record in the manifest (if there is one) that ``module`` of current layer ``layer`` was refit."""
    if isinstance(layout, ManifestLike):
        layout.mark_overridden(layer, module)
