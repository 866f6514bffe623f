"""Parameter accounting: one definition of size and sparsity, used in every result.

- ``total``: every distinct parameter tensor element of the model (tied embeddings counted once).
- ``prunable``: elements of the decoder layers' linear weights (q/k/v/o, gate/up/down), biases and
  norms excluded; this is what structured pruning removes.
- ``structural_sparsity``: fraction of the *base* model's prunable elements physically gone
  (1 - prunable / base_prunable). Only this makes a model smaller.
- ``mask_sparsity``: fraction of the remaining prunable elements that are exactly zero (masks).
  A masked model is not smaller and not faster on dense kernels.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.offload import materialized


class ParameterCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    total: int
    prunable: int
    base_prunable: int
    prunable_zeros: int

    @property
    def structural_sparsity(self) -> float:
        return 1.0 - self.prunable / self.base_prunable if self.base_prunable else 0.0

    @property
    def mask_sparsity(self) -> float:
        return self.prunable_zeros / self.prunable if self.prunable else 0.0

    def summary(self) -> dict:
        return self.model_dump() | {
            "structural_sparsity": round(self.structural_sparsity, 6),
            "mask_sparsity": round(self.mask_sparsity, 6),
            "definition": "prunable = decoder-layer linear weights; structural = 1 - prunable/base_prunable",
        }


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters take in memory (what an fp32/bf16 weights file holds)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prunable_weights(adapter: FamilyAdapter) -> list[nn.Parameter]:
    return [m.weight for layer in adapter.layers() for m in adapter.linear_modules(layer).values()]


def prunable_parameters(adapter: FamilyAdapter) -> int:
    return sum(w.numel() for w in prunable_weights(adapter))


def count_parameters(model: nn.Module, base_prunable: int | None = None) -> ParameterCounts:
    """Count ``model``; ``base_prunable`` is the dense model's prunable count (default: this model's)."""
    adapter = adapter_for(model)
    weights = prunable_weights(adapter)
    prunable = sum(w.numel() for w in weights)
    zeros = 0
    for layer in adapter.layers():  # an offloaded layer's values are read one layer at a time
        with materialized(layer):
            zeros += sum(int((m.weight == 0).sum()) for m in adapter.linear_modules(layer).values())
    return ParameterCounts(
        total=total_parameters(model),
        prunable=prunable,
        base_prunable=base_prunable if base_prunable is not None else prunable,
        prunable_zeros=zeros,
    )
