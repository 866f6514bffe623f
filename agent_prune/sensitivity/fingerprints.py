"""Cheap identities of a model and of each decoder layer, so unchanged work can be reused safely.

A tensor's digest covers its name, shape and dtype, its float64 sum and L2 norm (rounded to 12
significant digits so thread-order rounding cannot flip it), and a strided sample of its values:
any shape change (structured pruning), refit or masked weight changes it, without hashing every
byte. A false "changed" only costs a recomputation; reuse needs every digest to match.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from agent_prune.models.adapters import adapter_for
from agent_prune.models.offload import materialized, state_items

SAMPLES_PER_TENSOR = 1024
# Elements taken to float64 at a time: the whole-tensor float64 copies of a tied embedding and its
# head (28M elements each on the shared model) took 730 MiB at the end of every profile.
CHUNK_ELEMENTS = 1 << 20


def _moments(flat: torch.Tensor) -> tuple[float, float]:
    """float64 sum and L2 norm of a flat tensor, a chunk at a time."""
    total = squares = 0.0
    for chunk in flat.split(CHUNK_ELEMENTS):
        chunk = chunk.double()
        total += float(chunk.sum())
        squares += float(torch.dot(chunk, chunk))
    return total, math.sqrt(squares)


def _update(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    flat = t.reshape(-1)
    total, norm = _moments(flat)
    sample = flat[:: max(flat.numel() // SAMPLES_PER_TENSOR, 1)].to("cpu", torch.float32).contiguous()
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{total:.12g}:{norm:.12g}".encode())
    h.update(sample.numpy().tobytes())


def layer_fingerprint(layer: nn.Module) -> str:
    """Identity of one decoder layer's tensors (weights, biases, norms, buffers)."""
    h = hashlib.sha256()
    with materialized(layer):
        for name, tensor in layer.state_dict().items():
            _update(h, name, tensor)
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Identity of the whole model as it is now (every tensor of its state dict; offloaded layers
    are read one at a time)."""
    adapter = adapter_for(model)
    prefixes = {adapter.layer_key_prefix(i): layer for i, layer in enumerate(adapter.layers())}
    h = hashlib.sha256(model.config.model_type.encode())
    for name, tensor in state_items(model, prefixes):
        _update(h, name, tensor)
    return h.hexdigest()[:16]


def prefix_keys(calibration_digest: str, layer_fingerprints: list[str]) -> list[str]:
    """``keys[i]`` identifies the inputs of layer ``i``: the calibration set and layers ``< i``."""
    keys = [calibration_digest]
    for fingerprint in layer_fingerprints:
        keys.append(hashlib.sha256(f"{keys[-1]}:{fingerprint}".encode()).hexdigest()[:16])
    return keys
