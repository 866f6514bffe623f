"""Bias compensation for width cuts (FLAP, An et al., arXiv 2312.11983).

An output projection (``o_proj``, ``down_proj``) adds ``W[:, j] * x_j`` to the residual stream for
each input channel ``j``. Split ``x_j`` into its mean over the calibration tokens ``m_j`` and what
varies from token to token: the mean part is one fixed vector, so when the cut removes channel ``j``
that part can stay behind exactly, as the bias ``b += W[:, j] * m_j``. The cut then loses only the
fluctuation (what the ``fluctuation`` pruner ranks channels by), and the block's output averaged over
the calibration tokens is unchanged. Recovery's refit (:mod:`.reconstruct`) fits the kept weights
toward the target minus the bias, so it keeps what is set here and fits the rest.

The means come from the sensitivity profile of the model before the cut (``input_means``, by
position in each of its layers); the two manifests say which positions the cut removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from agent_prune.actions.manifest import Manifest
from agent_prune.actions.surgery import unit_features
from agent_prune.models.adapters import adapter_for
from agent_prune.models.offload import materialized
from agent_prune.recovery.reconstruct import ATTN_OUT, MLP_OUT
from agent_prune.sensitivity.schema import InputMeans


def removed_positions(kept_before: Sequence[int], kept_after: Sequence[int]) -> torch.Tensor:
    """Positions, in the layer before the cut, of the original indices the cut removed."""
    survivors = set(kept_after)
    return torch.tensor([p for p, original in enumerate(kept_before) if original not in survivors],
                        dtype=torch.long)


def mean_contribution(weight: torch.Tensor, means: Sequence[float], columns: torch.Tensor) -> torch.Tensor:
    """``W[:, columns] @ means[columns]`` in float64: what those input columns add on average."""
    if len(means) != weight.shape[1]:
        raise ValueError(f"{len(means)} input means for a projection with {weight.shape[1]} inputs")
    columns = columns.to(weight.device)
    mean = torch.as_tensor(means, dtype=torch.float64, device=weight.device)[columns]
    return weight.detach()[:, columns].double() @ mean


def bias_corrections(before: nn.Module, old: Manifest, new: Manifest,
                     input_means: Sequence[InputMeans]) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer in new, module): vector to add to its bias}`` for every projection that lost inputs.

    ``before`` is the model shaped as ``old`` (left untouched); ``input_means[i]`` are the means of
    its layer ``i``. A removed query head takes its ``head_dim`` o_proj columns; a removed layer needs
    nothing (what it added is not in the model any more).
    """
    if len(input_means) != len(old.layers):
        raise ValueError(f"{len(input_means)} layers of input means for a model with {len(old.layers)}")
    adapter = adapter_for(before)
    positions = {record.source: i for i, record in enumerate(old.layers)}
    corrections = {}
    for index, record in enumerate(new.layers):
        position = positions[record.source]
        was, means, layer = old.layers[position], input_means[position], adapter.layers()[position]
        cuts = {ATTN_OUT: (unit_features(removed_positions(was.heads, record.heads), adapter.head_dim),
                           means.o_proj),
                MLP_OUT: (removed_positions(was.mlp_channels, record.mlp_channels), means.down_proj)}
        with materialized(layer):
            for module, (columns, module_means) in cuts.items():
                if len(columns):
                    weight = layer.get_submodule(module).weight
                    corrections[index, module] = mean_contribution(weight, module_means, columns)
    return corrections


@torch.no_grad()
def add_to_bias(linear: nn.Linear, delta: torch.Tensor) -> None:
    """``linear.bias += delta``, giving it a zero bias first if it has none (stock projections)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features),
                                   requires_grad=linear.weight.requires_grad)
    linear.bias.copy_((linear.bias.double() + delta.to(linear.bias.device)).to(linear.bias.dtype))


def compensate_biases(before: nn.Module, after: nn.Module, old: Manifest, new: Manifest,
                      input_means: Sequence[InputMeans]) -> list[str]:
    """Fold the mean contribution of everything the cut from ``old`` to ``new`` removed into the
    biases of ``after`` (``before`` cut down to ``new``); returns the keys of the changed modules,
    which are marked overridden in ``new`` so checkpoints keep their biases."""
    layers = adapter_for(after).layers()
    changed = []
    for (index, module), delta in bias_corrections(before, old, new, input_means).items():
        with materialized(layers[index], write=True) as layer:
            add_to_bias(layer.get_submodule(module), delta)
        changed.append(new.mark_overridden(index, module))
    return changed
