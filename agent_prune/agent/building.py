"""Candidates: a step's actions applied to a copy of the current model, recovered, and saved; and
the distillation healing of an accepted step (``--recovery distill``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from agent_prune.actions import Manifest
from agent_prune.agent.resources import RunResources
from agent_prune.agent.states import ModelStates, save_state
from agent_prune.heap import release_memory
from agent_prune.models.offload import shared_memo

if TYPE_CHECKING:
    from agent_prune.sensitivity.measure import WalkProfile

# A candidate's sensitivity profile, measured during its refit walk, beside its state: an accepted
# step carries it, and the next iteration reads it instead of profiling the step again.
PROFILE_FILE = "profile.json"


def first_changed_layer(actions: list[dict]) -> int:
    """The first current layer whose weights or inputs ``actions`` change (after a removal, the layer
    that moves into the removed one's place)."""
    indices = [a["layer"] for a in actions if "layer" in a]
    indices += [i for a in actions for i in a.get("layers", [])]
    return min(indices, default=0)


class CandidateBuilder:
    def __init__(self, resources: RunResources):
        self.resources = resources

    def build(self, states: ModelStates, current: Path, actions: list[dict], profile: dict,
              target: Path, pruner: str = "l2", measure: bool = False) -> dict:
        """Apply ``actions`` to saved state ``current`` (structures chosen by ``pruner``'s scores
        from ``profile``), recover it, and save it under ``target``; the candidate is dropped on
        return (the evaluate node replays it). With ``measure`` its refit walk also measures its
        sensitivity profile (saved as ``PROFILE_FILE`` when the walk covered every layer).

        The current step's model leaves the state cache before the cut, so the build owns it and
        cuts it in place: the peak is the dense model and one candidate (issue 16: the step's model
        beside its copy was the run's largest resident set); the step's next candidate replays it
        again (seconds)."""
        model, manifest = states.load(current)
        states.release()
        candidate, new_manifest, info = self.cut(model, manifest, actions, profile, pruner, in_place=True)
        del model
        release_memory()  # the cut's freed rows, before the refit's working set
        walk = self.walk_profile(candidate, new_manifest) if measure else None
        info["recovery"] = self.recover(candidate, new_manifest, first_changed=first_changed_layer(actions),
                                        measure=walk)
        measured = walk.profile() if walk is not None else None
        info["profile_measured"] = measured is not None
        extra = {PROFILE_FILE: measured.model_dump(mode="json")} if measured is not None else None
        save_state(target, candidate, new_manifest, {"actions": actions, **info}, extra)
        return info

    def walk_profile(self, candidate: nn.Module, manifest: Manifest) -> WalkProfile | None:
        """A :class:`~agent_prune.sensitivity.measure.WalkProfile` of ``candidate`` on the run's
        calibration windows, or None where the refit walk cannot stand in for the profile (no refit,
        or gradient metrics wanted)."""
        options = self.resources.options
        if options.recovery != "reconstruct" or options.profile_gradients:
            return None
        from agent_prune.sensitivity.measure import WalkProfile

        sources = [record.source for record in manifest.layers]
        return WalkProfile(candidate, self.resources.calibration, sources, hessians=options.profile_hessians,
                           dataset="c4", seed=options.seed, model_name=options.model)

    def candidate(self, model: nn.Module, manifest: Manifest, actions: list[dict], profile: dict,
                  pruner: str = "l2") -> tuple[nn.Module, Manifest, dict]:
        """(candidate, its manifest, info): ``actions`` applied to a copy of ``model``, recovered."""
        candidate, new_manifest, info = self.cut(model, manifest, actions, profile, pruner)
        info["recovery"] = self.recover(candidate, new_manifest, first_changed=first_changed_layer(actions))
        return candidate, new_manifest, info

    def cut(self, model: nn.Module, manifest: Manifest, actions: list[dict], profile: dict,
            pruner: str = "l2", in_place: bool = False) -> tuple[nn.Module, Manifest, dict]:
        """(candidate, its manifest, info): ``actions`` applied to a copy of ``model`` (which is left
        as it was), with the fluctuation pruner's bias compensation; not yet recovered. With
        ``in_place`` the caller gives ``model`` up and it may become the candidate itself (not when
        the bias compensation must read the removed weights, nor for an offloaded model, whose
        layers have homes of their own)."""
        from agent_prune.actions import apply_actions
        from agent_prune.agent.decisions import describe_actions
        from agent_prune.models.accounting import count_parameters
        from agent_prune.models.offload import is_offloaded
        from agent_prune.sensitivity.schema import STRUCTURE_FIELDS, SensitivityProfile

        parsed = SensitivityProfile.model_validate(profile)
        if getattr(parsed.layers[0], STRUCTURE_FIELDS[pruner]) is None:
            pruner = "l2"  # e.g. taylor from a profile without gradients; the record says so
        reuse = in_place and pruner != "fluctuation" and not is_offloaded(model)
        candidate = model if reuse else copy.deepcopy(model, shared_memo(model))
        scores = dict(enumerate(parsed.structure_scores(pruner)))
        new_manifest = apply_actions(candidate, actions, manifest, scores=scores,
                                     protected=profile.get("protected", []))
        compensation = {}
        if pruner == "fluctuation":
            # FLAP's score ranks what varies from token to token; what does not (the removed inputs'
            # mean output) stays as a bias. Set before the refit, which fits the kept weights around it.
            from agent_prune.recovery.bias import compensate_biases

            modules = compensate_biases(model, candidate, manifest, new_manifest,
                                        [layer.input_means for layer in parsed.layers])
            compensation = {"bias_compensation": {"modules": len(modules)}}
        counts = count_parameters(candidate, base_prunable=new_manifest.base.prunable_parameters)
        info = {"params": counts.total, "prunable": counts.prunable,
                "sparsity": round(counts.structural_sparsity, 6), "summary": describe_actions(actions),
                "pruner": pruner, **compensation}
        return candidate.eval(), new_manifest, info

    def recover(self, model: nn.Module, manifest: Manifest, first_changed: int = 0,
                measure: WalkProfile | None = None) -> dict | None:
        """Local reconstruction of a candidate (``--recovery reconstruct``, the default): each cut
        layer's output projections refitted toward the dense sub-block on the candidate's own inputs
        (each layer measured on the way by ``measure``, a ``WalkProfile``).

        ``distill`` heals accepted steps instead and does not reconstruct candidates first."""
        if self.resources.options.recovery != "reconstruct":
            return None
        from agent_prune.recovery import reconstruct

        # Every state the loop builds on was reconstructed on the same windows (or is dense), so
        # layers before this step's first change would refit to what they already hold.
        with self.resources.computing():
            report = reconstruct(model, self.resources.base.model, manifest, self.resources.calibration,
                                 first_changed=first_changed, measure=measure)  # marks overrides
        return {"method": "reconstruct", "seconds": round(report.seconds, 2),
                "modules": len(report.overrides)}

    def heal(self, model: nn.Module, manifest: Manifest, share: float) -> dict:
        """Distillation healing of an accepted state with ``share`` of the run's healing budget."""
        from agent_prune.recovery import HealSettings, heal
        from agent_prune.recovery.calibration import recovery_windows

        r, o = self.resources, self.resources.options
        tokens = max(o.seqlen, int(o.heal_tokens * share))
        settings = HealSettings(max_tokens=tokens, max_seconds=max(1.0, o.heal_seconds * share),
                                seed=o.seed)
        windows, heldout = recovery_windows(r.base.tokenizer, r.data_dir, tokens=tokens, seqlen=o.seqlen)
        r.reporter.finishing(f"healing ({tokens} tokens at most)")
        report = heal(model, r.base.model, windows, settings, eval_windows=heldout,
                      manifest=manifest)  # marks the healed modules overridden
        return {"method": "distill", "tokens": report.tokens, "seconds": round(report.seconds, 1),
                "kl_before": report.kl_before, "kl_after": report.kl_after}
