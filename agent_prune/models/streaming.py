"""Run a decoder one layer at a time on calibration windows (the SparseGPT/Wanda streaming scheme).

The one layer-streaming engine for every calibration pass (sensitivity profile, reconstruction,
baselines). :func:`capture_layer_inputs` runs the backbone with every decoder layer swapped for a
recorder that passes hidden states through unchanged: no layer runs, yet it yields the embeddings
(inputs of layer 0) and the exact keyword arguments every layer receives (attention masks per layer
type, position embeddings, position ids). The driver then feeds each layer's outputs to the next
with :func:`run_layer`, holding activations for the current layer only. Weights can stay on the
CPU: :func:`on_device` moves one module to the accelerator for as long as it runs. :func:`tap`
records what one module inside a layer sees. Layers multiply in the compute dtype that the caller
set (:func:`agent_prune.models.precision.compute_dtype`; float32 by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from agent_prune.models.adapters import FamilyAdapter
from agent_prune.models.offload import materialized, slot_of
from agent_prune.models.precision import autocast_forward


@dataclass
class LayerInputs:
    """Inputs of layer 0 for all samples, and each layer's keyword arguments (for any batch)."""

    hidden: torch.Tensor | None               # (samples, seqlen, hidden), on the work device
    batches: list[slice]                      # sample ranges, one per calibration batch
    kwargs: list[dict]                        # kwargs[layer]


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers needs to run."""


class _Recorder(nn.Module):
    """Stands in for one decoder layer: records its keyword arguments, returns its input."""

    def __init__(self, index: int, sink: dict[int, dict], first_inputs: list, last: bool):
        super().__init__()
        self.index, self.sink, self.first_inputs, self.last = index, sink, first_inputs, last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to receive keyword arguments only")
        self.sink[self.index] = kwargs
        if self.index == 0:
            self.first_inputs.append(hidden_states)
        if self.last:
            raise _StopForward
        return hidden_states


# A refit walk's part: 8 windows of 512, whose 25 MB buffers are mapped and returned (heap.py).
WALK_BATCH_TOKENS = 4096


def windows_per_batch(tokens: int, seqlen: int) -> int:
    """Windows of ``seqlen`` tokens in a batch of about ``tokens`` tokens (at least one), so that a
    pass's buffers keep their size whatever the calibration windows' length."""
    return max(1, tokens // seqlen)


def batch_slices(total: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` over ``total`` items (the last one may be shorter)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


@torch.no_grad()
def capture_layer_inputs(
    adapter: FamilyAdapter, windows: torch.Tensor, batch_size: int, device: torch.device
) -> LayerInputs:
    """Embeddings and per-layer kwargs for ``windows``, batch by batch, without running any layer.

    The kwargs come from the first window alone: calibration windows carry no padding, so masks
    and position embeddings are the same for every window and broadcast over any batch size (one
    copy per layer instead of one per batch). Batches are written into one preallocated buffer, so
    the embeddings never exist twice.
    """
    first, kwargs = _record(adapter, windows[:1], device)
    hidden = first.new_empty((windows.shape[0], *first.shape[1:]))
    batches = batch_slices(windows.shape[0], batch_size)
    for batch in batches:
        hidden[batch] = _record(adapter, windows[batch], device)[0]
    return LayerInputs(hidden, batches, kwargs)


def _record(adapter: FamilyAdapter, ids: torch.Tensor, device: torch.device
            ) -> tuple[torch.Tensor, list[dict]]:
    """One backbone pass on ``ids`` with recorders for layers: layer 0's input, every layer's kwargs."""
    layers = adapter.layers()
    originals = list(layers)
    sink: dict[int, dict] = {}
    first: list[torch.Tensor] = []
    try:
        for i in range(len(originals)):
            layers[i] = _Recorder(i, sink, first, last=i == len(originals) - 1)
        with (
            on_device(adapter.embed_tokens(), device),
            on_device(adapter.rotary_embedding(), device),
            contextlib.suppress(_StopForward),
        ):
            adapter.backbone()(input_ids=ids.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return first[0], [sink[i] for i in range(len(originals))]


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run ``module`` on ``device``, then move it back to where it was (no-op when already there);
    an offloaded layer is brought in from its home (``offload.materialized``) and dropped after."""
    if slot_of(module) is not None:
        with materialized(module, device=device):
            yield module
        return
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    home = tensor.device if tensor is not None else device
    if home != device:
        module.to(device)
    try:
        yield module
    finally:
        if home != device:
            module.to(home)


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer's output (transformers 5 returns a tensor; older versions a tuple), multiplied
    in the run's compute dtype (:mod:`agent_prune.models.precision`)."""
    with autocast_forward(hidden.device):
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Tap:
    """The input and output a module saw during the last call (set while inside ``tap``)."""

    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None


@contextlib.contextmanager
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
