"""Run a decoder one layer at a time on calibration windows, and tap a module's input and output.

Layer-by-layer calibration (as in SparseGPT and Wanda) keeps only the hidden states entering the
current layer in memory. transformers 5.x decoder layers need the keyword arguments the backbone
builds (``position_embeddings``, the causal mask for the layer's attention type, ``position_ids``):
they are caught once per layer with forward pre-hooks on a one-window forward pass and reused for
every batch (they broadcast over the batch dimension when there is no padding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from agent_prune.models.adapters import FamilyAdapter

_DROPPED_KWARGS = ("cache", "use_cache", "cache_position", "output_attentions")


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward pass once the wanted inputs are caught."""


@torch.no_grad()
def layer_kwargs(adapter: FamilyAdapter, window: torch.Tensor) -> list[dict]:
    """Keyword arguments each decoder layer receives, caught from one forward pass on ``window``."""
    caught: list[dict | None] = [None] * adapter.num_layers

    def catcher(index: int):
        def hook(_module, _args, kwargs):
            caught[index] = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        return hook

    handles = [layer.register_forward_pre_hook(catcher(i), with_kwargs=True)
               for i, layer in enumerate(adapter.layers())]
    try:
        adapter.model(input_ids=window.reshape(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [k if k is not None else {} for k in caught]


@torch.no_grad()
def embed(adapter: FamilyAdapter, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states entering decoder layer 0 for ``ids`` (batch, seqlen), whatever the family scales."""
    caught: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        caught.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = adapter.layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return caught[0]


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Tap:
    """The input and output a module saw during the last call (set while inside ``tap``)."""

    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None


@contextmanager
def tap(module: nn.Module) -> Iterator[Tap]:
    """Record ``module``'s (first) input and its output on every call inside the block."""
    record = Tap()

    def hook(_module, args, output):
        record.inputs, record.outputs = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
