"""Drivers that cut a model with one baseline method; every cut goes through ``apply_actions``.

All methods share one calibration set (C4, ``CALIBRATION`` windows, seed 0: the agent loop's own
defaults) and, per row, one recovery setting: ``none`` or ``reconstruct``
(:func:`agent_prune.recovery.reconstruct`, the agent's default recovery, on the same windows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from agent_prune.actions import Manifest, apply_actions, dense_manifest
from agent_prune.actions.presets import uniform_width_actions
from agent_prune.models.adapters import adapter_for
from agent_prune.models.streaming import capture_layer_inputs, run_layer
from agent_prune.sensitivity.collectors import LinearCollector
from bench.compare.methods import shortgpt_actions, wanda_sp_scores, width_actions


@dataclass(frozen=True)
class Calibration:
    samples: int = 16
    seqlen: int = 512
    seed: int = 0

    def windows(self, tokenizer, data_dir) -> torch.Tensor:
        from agent_prune.data.corpora import c4_documents, calibration_windows

        return calibration_windows(tokenizer, c4_documents(data_dir), self.samples, self.seqlen, self.seed)

    def describe(self) -> str:
        return (f"C4 (first 1000 train documents), {self.samples} random {self.seqlen}-token windows, "
                f"seed {self.seed}")


def prune_shortgpt(model: nn.Module, windows: torch.Tensor, target: float, device: str = "cpu"
                   ) -> tuple[Manifest, dict]:
    """ShortGPT one shot: Block Influence on the dense model, lowest-BI layers removed."""
    from agent_prune.sensitivity import profile_model

    profile = profile_model(model, windows, gradients=False, device=device)
    influence = [layer.block_influence for layer in profile.layers]
    actions = shortgpt_actions(influence, dense_manifest(model), target)
    manifest = apply_actions(model, actions, dense_manifest(model))
    return manifest, {"block_influence": [round(v, 5) for v in influence],
                      "actions": [a.model_dump() for a in actions]}


@torch.no_grad()
def prune_wanda_sp(model: nn.Module, windows: torch.Tensor, target: float, device: str = "cpu",
                   batch_size: int = 4) -> tuple[Manifest, dict]:
    """Wanda-sp, uniform: layer by layer, score on the activations of the model pruned so far, cut."""
    adapter = adapter_for(model)
    manifest = dense_manifest(model)
    actions = uniform_width_actions(manifest, target)
    inputs = capture_layer_inputs(adapter, windows, batch_size, torch.device(device))
    hidden = inputs.hidden
    for index, action in enumerate(actions):
        layer = adapter.layers()[index]
        o_proj = adapter.attention_projections(layer)["o_proj"]
        down = adapter.mlp_projections(layer)["down_proj"]
        collectors = [LinearCollector(o_proj), LinearCollector(down)]
        handles = [c.module.register_forward_hook(c.hook) for c in collectors]
        try:
            for batch in inputs.batches:
                run_layer(layer, hidden[batch], inputs.kwargs[index])
        finally:
            for handle in handles:
                handle.remove()
        widths = adapter.layer_widths(layer)
        scores = wanda_sp_scores(o_proj.weight, collectors[0].input_norm(), down.weight,
                                 collectors[1].input_norm(), adapter.head_dim, widths.num_kv_heads)
        manifest = apply_actions(model, [action], manifest, scores={index: scores})
        layer = adapter.layers()[index]
        for batch in inputs.batches:
            hidden[batch] = run_layer(layer, hidden[batch], inputs.kwargs[index])
    return manifest, {"actions": [a.model_dump() for a in actions]}


def prune_width_global(model: nn.Module, windows: torch.Tensor, target: float, device: str = "cpu",
                       score: str = "l2") -> tuple[Manifest, dict]:
    """The loop's width pruner once: profile scores, global allocation, MLP channels only."""
    from agent_prune.sensitivity import profile_model

    profile = profile_model(model, windows, gradients=score == "taylor", hessians=score == "obs",
                            device=device)
    structures = profile.structure_scores(score)
    dense = dense_manifest(model)
    actions = width_actions([s["mlp_channels"] for s in structures], dense, target)
    before = copy.deepcopy(model) if score == "fluctuation" else None
    manifest = apply_actions(model, actions, dense, scores=dict(enumerate(structures)))
    details = {"actions": [a.model_dump() for a in actions]}
    if before is not None:  # FLAP: the removed channels' mean output stays as a bias
        from agent_prune.recovery.bias import compensate_biases

        details["bias_modules"] = len(compensate_biases(before, model, dense, manifest,
                                                        [layer.input_means for layer in profile.layers]))
    return manifest, details


def recover(model: nn.Module, dense: nn.Module, manifest: Manifest, windows: torch.Tensor,
            recovery: str) -> dict | None:
    """The agent loop's recovery (``CandidateBuilder.recover``), so every method gets the same one."""
    if recovery == "none":
        return None
    from agent_prune.recovery import reconstruct

    report = reconstruct(model, dense, [record.source for record in manifest.layers], windows)
    for key in report.overrides:
        manifest.mark_overridden(None, key)
    return {"method": "reconstruct", "seconds": round(report.seconds, 2), "modules": len(report.overrides)}


ONE_SHOT = {"shortgpt": prune_shortgpt, "wanda_sp": prune_wanda_sp,
            "l2_global": prune_width_global,
            "taylor_global": partial(prune_width_global, score="taylor"),
            "fluctuation_global": partial(prune_width_global, score="fluctuation"),
            "obs_global": partial(prune_width_global, score="obs")}
