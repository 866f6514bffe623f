"""Bias-compensated cuts of tiny models for tests: the input means are measured here with forward
hooks (not by the profile's collectors), then the cut is applied and compensated."""

from __future__ import annotations

import copy

import torch
from torch import nn

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.actions.manifest import Manifest
from agent_prune.models.adapters import adapter_for
from agent_prune.recovery.bias import compensate_biases
from agent_prune.sensitivity.schema import InputMeans

OUTPUT_PROJECTIONS = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}


def calibration_ids(count: int = 4, seqlen: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def input_means(model: nn.Module, ids: torch.Tensor) -> list[InputMeans]:
    """Per layer, the mean over every token of ``ids`` of each o_proj and down_proj input channel."""
    means, handles = {}, []

    def keep_mean(key):
        def hook(_module, args, _output):
            means[key] = args[0].reshape(-1, args[0].shape[-1]).double().mean(dim=0).tolist()
        return hook

    layers = adapter_for(model).layers()
    for index, layer in enumerate(layers):
        for name, path in OUTPUT_PROJECTIONS.items():
            handles.append(layer.get_submodule(path).register_forward_hook(keep_mean((index, name))))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return [InputMeans(**{name: means[index, name] for name in OUTPUT_PROJECTIONS})
            for index in range(len(layers))]


def compensated_cut(model: nn.Module, actions, ids: torch.Tensor, manifest: Manifest | None = None
                    ) -> tuple[nn.Module, Manifest]:
    """A copy of ``model`` cut by ``actions``, with bias compensation from its means on ``ids``."""
    manifest = manifest or dense_manifest(model)
    cut = copy.deepcopy(model)
    new = apply_actions(cut, actions, manifest)
    compensate_biases(model, cut, manifest, new, input_means(model, ids))
    return cut, new
