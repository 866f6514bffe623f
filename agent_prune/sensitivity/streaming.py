"""Layer-at-a-time calibration (the SparseGPT/Wanda streaming scheme) and its activation store.

:func:`capture_layer_inputs` runs the backbone with every decoder layer swapped for a recorder
that passes hidden states through unchanged: one cheap pass yields the embeddings (inputs of
layer 0) and the exact keyword arguments every layer would receive (attention masks per layer
type, position embeddings, position ids), batch by batch. The driver then feeds each layer's
outputs to the next, holding activations for the current layer only. Weights can stay on the
CPU: :func:`on_device` moves one module to the accelerator for as long as it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent_prune.errors import InputError
from agent_prune.models.adapters import FamilyAdapter


@dataclass
class LayerInputs:
    """Inputs of layer 0 for all samples, and each batch's per-layer keyword arguments."""

    hidden: torch.Tensor                      # (samples, seqlen, hidden), on the work device
    batches: list[slice]                      # sample ranges, one per calibration batch
    kwargs: list[list[dict]]                  # kwargs[batch][layer]


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


def calibration_batches(samples: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, samples)) for start in range(0, samples, batch_size)]


@torch.no_grad()
def capture_layer_inputs(
    adapter: FamilyAdapter, windows: torch.Tensor, batch_size: int, device: torch.device
) -> LayerInputs:
    """Embeddings and per-layer kwargs for ``windows``, batch by batch, without running any layer."""
    layers = adapter.layers()
    originals = list(layers)
    batches = calibration_batches(windows.shape[0], batch_size)
    hidden, kwargs = [], []
    try:
        for batch in batches:
            sink: dict[int, dict] = {}
            for i in range(len(originals)):
                layers[i] = _Recorder(i, sink, hidden, last=i == len(originals) - 1)
            with (
                on_device(adapter.embed_tokens(), device),
                on_device(adapter.rotary_embedding(), device),
                contextlib.suppress(_StopForward),
            ):
                adapter.backbone()(input_ids=windows[batch].to(device), use_cache=False)
            kwargs.append([sink[i] for i in range(len(originals))])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(torch.cat(hidden), batches, kwargs)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run ``module`` on ``device``, then move it back to where it was (no-op when already there)."""
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
    """One decoder layer's output (transformers 5 returns a tensor; older versions a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def windows_digest(windows: torch.Tensor) -> str:
    """Identity of a calibration set: the token ids' bytes (reused activations must match it)."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


class ActivationStore:
    """Layer inputs for the whole calibration set, by current layer index, for the backward pass.

    ``disk`` (default) writes each tensor to a temporary file and reads it back when needed, so
    host memory holds one layer's activations at a time; ``memory`` keeps them as tensors (fast,
    but ``layers x samples x seqlen x hidden`` elements stay resident). A store remembers which
    calibration set it holds (``digest``) so a later profile can reuse the unchanged prefix.
    """

    def __init__(self, kind: str = "disk", directory: str | Path | None = None):
        if kind not in ("disk", "memory"):
            raise InputError(f"unknown activation store '{kind}'", "use 'disk' or 'memory'")
        self.kind = kind
        self.digest: str | None = None
        self._tensors: dict[int, torch.Tensor] = {}
        self._meta: dict[int, tuple[torch.Size, torch.dtype]] = {}
        self._dir = None
        if kind == "disk":
            self._dir = Path(tempfile.mkdtemp(prefix="agent-prune-acts-", dir=directory))

    def reset(self, digest: str) -> None:
        """Start holding activations of the calibration set ``digest`` (drops any other set's)."""
        if digest != self.digest:
            self.drop_from(0)
            self.digest = digest

    def put(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self._dir is None:
            self._tensors[index] = tensor.clone()
        else:
            raw = tensor.to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
            raw.tofile(self._dir / f"layer{index}.bin")
        self._meta[index] = (tensor.shape, tensor.dtype)

    def has(self, index: int) -> bool:
        return index in self._meta

    def get(self, index: int, device: torch.device) -> torch.Tensor:
        if self._dir is None:
            return self._tensors[index].to(device)
        shape, dtype = self._meta[index]
        raw = torch.from_numpy(np.fromfile(self._dir / f"layer{index}.bin", dtype=np.uint8))
        return raw.view(dtype).reshape(shape).to(device)

    def drop_from(self, index: int) -> None:
        """Forget layers ``index`` and above (they change when an earlier layer changes)."""
        for i in [i for i in self._meta if i >= index]:
            self._meta.pop(i)
            self._tensors.pop(i, None)
            if self._dir is not None:
                (self._dir / f"layer{i}.bin").unlink(missing_ok=True)

    def close(self) -> None:
        self.drop_from(0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
