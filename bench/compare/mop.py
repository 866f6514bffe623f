"""The MoP fixed rule (Mixture-of-Pruners, arXiv 2602.06127) as a loop of agent-prune actions.

Each step builds two candidates from the current model: depth (remove the third-to-last layer, as
in the published code) and width (AMP scores, about one dense layer's parameters spread evenly over
the layers; see :func:`bench.compare.methods.mop_width_actions`). Both get the row's recovery; the
one closer to the dense model wins. Closeness here: mean token-level ``KL(dense || candidate)`` on 4
held-aside C4 windows (the agent loop's KL windows). The paper heals every candidate with LoRA; on 2
CPU cores that is too slow for a 9-step run, so this version uses the same recovery as every other
row (local reconstruction, or none) and says so in the results.

Every accepted step is saved like an agent checkpoint (manifest + side tensors + record), so a run
to 30% serves 10% and 20% as well, and a killed run resumes from its last step.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from agent_prune.actions import Manifest, apply_actions, dense_manifest, replay, side_tensors
from agent_prune.checkpoints.store import read_state_dir, write_state_dir
from agent_prune.evaluation.divergence import reference_log_probs, window_kl
from agent_prune.io import read_json
from agent_prune.models.accounting import count_parameters
from bench.compare.methods import layer_params, mop_depth_actions, mop_width_actions
from bench.compare.prune import recover

TOLERANCE = 0.005  # the agent loop's: a step within half a percent of the target reaches it


def step_dirs(out: Path) -> list[Path]:
    return sorted(out.glob("step-[0-9][0-9][0-9][0-9]"))


def run_mop(dense: nn.Module, windows: torch.Tensor, kl_windows: torch.Tensor, target: float,
            recovery: str, out: Path, device: str = "cpu", log=print) -> None:
    """Run (or resume) the MoP loop until ``target`` structural sparsity; one directory per step."""
    from agent_prune.sensitivity import profile_model

    out.mkdir(parents=True, exist_ok=True)
    reference = reference_log_probs(dense, kl_windows)
    model, manifest, credit, elapsed, step = _resume(dense, out)
    base_prunable = manifest.base.prunable_parameters
    budget = layer_params(dense_manifest(dense), 0)
    started = time.perf_counter() - elapsed
    while count_parameters(model, base_prunable).structural_sparsity < target - TOLERANCE:
        profile = profile_model(model, windows, gradients=False, device=device,
                                layer_sources=[r.source for r in manifest.layers])
        scores = {layer.index: layer.structures.model_dump() for layer in profile.layers}
        width_actions, width_credit = mop_width_actions(manifest, budget, credit)
        candidates = {}
        for branch, actions in (("depth", mop_depth_actions(manifest)), ("width", width_actions)):
            candidate = copy.deepcopy(model)
            new_manifest = apply_actions(candidate, actions, manifest, scores=scores)
            recover(candidate, dense, new_manifest, windows, recovery)
            kl = float(window_kl(candidate, kl_windows, reference).mean())
            candidates[branch] = (candidate, new_manifest, actions, kl)
        kls = {b: round(c[3], 6) for b, c in candidates.items()}
        branch = min(kls, key=kls.get)
        model, manifest, actions, _ = candidates.pop(branch)
        del candidates
        credit = width_credit if branch == "width" else credit
        step += 1
        sparsity = count_parameters(model, base_prunable).structural_sparsity
        record = {"step": step, "branch": branch, "sparsity": round(sparsity, 6),
                  "seconds_from_start": round(time.perf_counter() - started, 1),
                  "kl_to_dense": kls, "kv_credit": {str(k): v for k, v in credit.items()},
                  "actions": [a.model_dump() for a in actions]}
        write_state_dir(out / f"step-{step:04d}", manifest.model_dump(mode="json"),
                        side_tensors(model, manifest), record)
        log(f"mop step {step}: {branch} -> sparsity {sparsity:.3f} ({record['seconds_from_start']:.0f} s)")


def _resume(dense: nn.Module, out: Path) -> tuple[nn.Module, Manifest, dict[int, float], float, int]:
    """The last saved step (model, manifest, KV credit, seconds spent, step number), or the dense start."""
    saved = step_dirs(out)
    if not saved:
        return copy.deepcopy(dense), dense_manifest(dense), {}, 0.0, 0
    manifest_json, tensors, record = read_state_dir(saved[-1])
    manifest = Manifest.model_validate(manifest_json)
    credit = {int(k): v for k, v in record["kv_credit"].items()}
    return replay(dense, manifest, tensors), manifest, credit, record["seconds_from_start"], record["step"]


def saved_steps(out: Path) -> list[dict]:
    """``[{step, sparsity, seconds_from_start, branch}]`` of a MoP run directory."""
    rows = []
    for path in step_dirs(out):
        record = read_json(path / "record.json")
        rows.append({k: record[k] for k in ("step", "sparsity", "seconds_from_start", "branch")}
                    | {"dir": str(path)})
    return rows
