"""Which dense layer each pruned layer came from, which of its inputs each output projection kept,
and where recovery records what it overwrote.

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


def kept_inputs(layout: Layout, index: int, head_dim: int) -> dict[str, list[int]] | None:
    """The dense input features that current layer ``index``'s output projections kept
    (``self_attn.o_proj``: the kept heads' columns; ``mlp.down_proj``: the kept channels), in the
    pruned projection's column order; None when ``layout`` is a plain list of sources."""
    if not isinstance(layout, ManifestLike):
        return None
    record = layout.layers[index]
    heads = [head * head_dim + offset for head in record.heads for offset in range(head_dim)]
    return {"self_attn.o_proj": heads, "mlp.down_proj": list(record.mlp_channels)}


def mark_overridden(layout: Layout | None, layer: int, module: str) -> None:
    """Record in the manifest (if there is one) that ``module`` of current layer ``layer`` was refit."""
    if isinstance(layout, ManifestLike):
        layout.mark_overridden(layer, module)
