"""Turn one layer's finished collectors (forward) or weight gradients (backward) into statistics.

Statistics are taken over the weights that remain (non-zero), so a mask-pruned layer is described
by what it still has. Pure with respect to the model: reads weights and ``.grad``, changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agent_prune.models.adapters import FamilyAdapter
from agent_prune.models.precision import full_precision
from agent_prune.sensitivity import metrics
from agent_prune.sensitivity.collectors import (
    ChannelCollector,
    DepthCollector,
    HeadCollector,
    LinearCollector,
    SpikeCandidate,
)


@dataclass
class ForwardStats:
    """Everything the forward pass learns about one layer."""

    params: int
    nonzero: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    block_influence: float
    angular_distance: float
    wanda: float
    wanda_p10: float
    modules: dict[str, dict]
    structures: dict[str, list[float]]
    structures_l2: dict[str, list[float]]
    structures_fluctuation: dict[str, list[float]]
    input_means: dict[str, list[float]]
    structures_obs: dict[str, list[float]] | None = None
    spikes: list[SpikeCandidate] = field(default_factory=list)
    peak_ratio: float = 0.0


@dataclass
class GradientStats:
    gradient: float
    taylor: float
    modules: dict[str, dict]
    structures: dict[str, list[float]]


def attach_collectors(adapter: FamilyAdapter, layer: nn.Module, hessian: bool = False,
                      hook_down: bool = True) -> tuple[dict[str, LinearCollector], list]:
    """A collector per linear module of ``layer``; o_proj and down_proj get the structural ones
    (with their input Gram matrices when ``hessian``, for OBS scores). Without ``hook_down`` the
    down_proj collector is returned unhooked, for the caller to feed.

    q/k/v read the attention input and gate/up the MLP input, so k, v and up share the input
    statistics of q and gate instead of accumulating the same sums again.
    """
    attention, mlp = adapter.attention_projections(layer), adapter.mlp_projections(layer)
    q = LinearCollector(attention["q_proj"])
    gate = LinearCollector(mlp["gate_proj"])
    by_module = {
        attention["q_proj"]: q,
        attention["k_proj"]: LinearCollector(attention["k_proj"], shares_input_with=q),
        attention["v_proj"]: LinearCollector(attention["v_proj"], shares_input_with=q),
        attention["o_proj"]: HeadCollector(attention["o_proj"], adapter.head_dim, hessian=hessian),
        mlp["gate_proj"]: gate,
        mlp["up_proj"]: LinearCollector(mlp["up_proj"], shares_input_with=gate),
        mlp["down_proj"]: ChannelCollector(mlp["down_proj"], hessian=hessian),
    }
    collectors = {name: by_module[module] for name, module in adapter.linear_modules(layer).items()}
    handles = [
        collector.module.register_forward_hook(full_precision(collector.hook))
        for collector in collectors.values()
        if collector.source is None and (hook_down or collector.module is not mlp["down_proj"])
    ]
    return collectors, handles


def forward_stats(
    adapter: FamilyAdapter,
    layer: nn.Module,
    collectors: dict[str, LinearCollector],
    depth: DepthCollector,
    spike_ratio: float,
    spike_min: float,
    obs_damping: float | None = None,
) -> ForwardStats:
    widths = adapter.layer_widths(layer)
    modules, kept_scores, total = {}, [], 0.0
    for name, collector in collectors.items():
        weight = collector.module.weight
        scores = _kept(collector.finalize(), nonzero_mask(weight))
        kept_scores.append(scores)
        score_sum = float(scores.sum(dtype=torch.float64))
        total += score_sum
        modules[name] = {
            "params": weight.numel(),
            "nonzero": scores.numel(),
            "wanda": score_sum / max(scores.numel(), 1),
            "wanda_p10": metrics.percentile(scores, 10),
            "input_norm": float(collector.input_norm().mean()),
        }
    all_scores = torch.cat(kept_scores)
    del kept_scores
    heads_collector = next(c for c in collectors.values() if isinstance(c, HeadCollector))
    channel_collector = next(c for c in collectors.values() if isinstance(c, ChannelCollector))
    heads = heads_collector.head_scores()
    return ForwardStats(
        params=sum(m["params"] for m in modules.values()),
        nonzero=all_scores.numel(),
        num_heads=widths.num_heads,
        num_kv_heads=widths.num_kv_heads,
        intermediate_size=widths.intermediate_size,
        block_influence=depth.block_influence(),
        angular_distance=depth.angular_distance(),
        wanda=total / max(all_scores.numel(), 1),
        wanda_p10=metrics.percentile(all_scores, 10),
        modules=modules,
        structures={
            "kv_groups": metrics.kv_group_scores(heads, widths.num_kv_heads).tolist(),
            "heads": heads.tolist(),
            "mlp_channels": channel_collector.channel_scores().tolist(),
        },
        structures_l2={k: v.tolist() for k, v in metrics.l2_structures(
            metrics.column_l2_scores(channel_collector.sum_squares, channel_collector.module.weight),
            heads_collector.sum_squares, heads_collector.module.weight, widths.num_kv_heads,
            adapter.head_dim).items()},
        structures_fluctuation=_fluctuation_structures(heads_collector, channel_collector, widths,
                                                       adapter.head_dim),
        structures_obs=_obs_structures(heads_collector, channel_collector, widths, adapter.head_dim,
                                       obs_damping),
        input_means={"o_proj": heads_collector.input_mean().tolist(),
                     "down_proj": channel_collector.input_mean().tolist()},
        spikes=channel_collector.spikes(spike_ratio, spike_min),
        peak_ratio=channel_collector.peak_ratio(),
    )


def _fluctuation_structures(heads: HeadCollector, channels: ChannelCollector, widths,
                            head_dim: int) -> dict[str, list[float]]:
    def columns(collector: LinearCollector) -> torch.Tensor:
        return metrics.column_fluctuation_scores(collector.sums, collector.sum_squares, collector.tokens,
                                                 collector.module.weight)

    scores = metrics.structures_from_columns(columns(channels), columns(heads), widths.num_kv_heads, head_dim)
    return {k: v.tolist() for k, v in scores.items()}


def _obs_structures(heads: HeadCollector, channels: ChannelCollector, widths, head_dim: int,
                    damping: float | None) -> dict[str, list[float]] | None:
    """OBS saliencies: one per MLP channel, per head (its ``head_dim`` o_proj columns) and per KV group
    (its heads' columns together); None when the Gram matrices were not collected."""
    if heads.xtx is None or channels.xtx is None or damping is None:
        return None
    o_weight = heads.module.weight
    return {
        "kv_groups": metrics.obs_group_scores(heads.xtx, o_weight, head_dim * widths.heads_per_group,
                                              damping).tolist(),
        "heads": metrics.obs_group_scores(heads.xtx, o_weight, head_dim, damping).tolist(),
        "mlp_channels": metrics.obs_group_scores(channels.xtx, channels.module.weight, 1, damping).tolist(),
    }


def gradient_stats(adapter: FamilyAdapter, layer: nn.Module) -> GradientStats:
    """Per-module and per-layer mean |grad| and |W * grad| from the weights' ``.grad``.

    Reduces module by module (sums and counts, row/column sums for structures) so that no more
    than one module's per-weight scores exist at a time.
    """
    modules, owned = {}, {}
    grad_sum = taylor_sum = count = 0.0
    for name, module in adapter.linear_modules(layer).items():
        weight, mask = module.weight, nonzero_mask(module.weight)
        taylor = metrics.taylor_scores(weight, weight.grad)
        kept = max(weight.numel() if mask is None else int(mask.sum()), 1)
        g = float(_kept(weight.grad.detach().abs(), mask).sum(dtype=torch.float64))
        t = float(_kept(taylor, mask).sum(dtype=torch.float64))
        modules[name] = {"gradient": g / kept, "taylor": t / kept}
        grad_sum, taylor_sum, count = grad_sum + g, taylor_sum + t, count + kept
        projection = name.rsplit(".", 1)[-1]
        owned[projection] = metrics.owned_sums(projection, taylor)
        del taylor
    structures = metrics.taylor_structures(owned, adapter.layer_widths(layer).num_kv_heads, adapter.head_dim)
    return GradientStats(
        gradient=grad_sum / count,
        taylor=taylor_sum / count,
        modules=modules,
        structures={k: v.tolist() for k, v in structures.items()},
    )


def nonzero_mask(weight: torch.Tensor) -> torch.Tensor | None:
    """Where ``weight`` is non-zero, or None when it is dense (the common case: no masking copy)."""
    if int(torch.count_nonzero(weight)) == weight.numel():
        return None
    return weight.detach() != 0


def _kept(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values`` at the non-zero weights, flattened."""
    return values.reshape(-1) if mask is None else values[mask]
