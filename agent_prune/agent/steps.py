"""The loop's steps in the checkpoint store: step 0 (the dense model and its scores), a state's
scores, and a candidate accepted as the next step (healed first with ``--recovery distill``)."""

from __future__ import annotations

from pathlib import Path

from agent_prune.agent.building import PROFILE_FILE, CandidateBuilder
from agent_prune.agent.resources import RunResources
from agent_prune.agent.scoring import Scoring
from agent_prune.agent.states import ModelStates
from agent_prune.checkpoints.store import read_state_dir
from agent_prune.heap import release_memory
from agent_prune.io import atomic_write_json, read_json


class Steps:
    def __init__(self, resources: RunResources, scoring: Scoring, states: ModelStates,
                 builder: CandidateBuilder):
        self.resources = resources
        self.scoring = scoring
        self.states = states
        self.builder = builder

    def commit_dense(self) -> dict:
        """Step 0: the dense model, scored once (or read from the evaluation cache)."""
        from agent_prune.actions import dense_manifest
        from agent_prune.models.accounting import count_parameters

        r, store = self.resources, self.states.store
        with r.trace.measure("phase", phase="load model") as fields:
            base = r.base
            if base.offload is not None:
                fields["offload"] = base.offload
        step_dir = store.step_dir(0)
        if not (step_dir / "signals.json").is_file():
            manifest = dense_manifest(base.model, fingerprint=base.source.fingerprint())
            r.reporter.finishing("scoring the dense model")
            with r.trace.measure("phase", phase="score dense") as fields:
                signals = self.scoring.dense_signals()
                fields["cached"] = signals.pop("cache", None) is not None
            store.commit(0, manifest.model_dump(mode="json"), {}, {"step": 0, "dense": True},
                         sparsity=0.0, extra={"signals.json": signals})
        counts = count_parameters(base.model)
        return {"dir": str(step_dir), "params": counts.total, "prunable": counts.prunable,
                "layers": base.adapter.num_layers, "record": str(step_dir / "signals.json")}

    def score_state(self, state_dir: Path, against: tuple[Path, Path] | None = None) -> Path:
        """``state_dir/signals.json``, scored from the state's replay unless it is already there;
        ``against``: the signals of the (current, dense) states a candidate is gated on."""
        path = Path(state_dir) / "signals.json"
        if not path.is_file():
            model, _ = self.states.replay(state_dir)
            records = None if against is None else (read_json(against[0]), read_json(against[1]))
            atomic_write_json(path, self.scoring.score(model, owned=True, against=records))
            del model
            release_memory()  # before the next candidate's replay
        return path

    def accept(self, step: int, candidate_dir: Path, decision: dict, candidate: dict,
               previous_sparsity: float) -> tuple[Path, dict | None]:
        """Commit a candidate as step ``step``; with ``--recovery distill``, heal it first.

        Returns the step's directory and the healing report (None when nothing was healed)."""
        options, store = self.resources.options, self.states.store
        manifest, tensors, record = read_state_dir(candidate_dir)
        signals = read_json(candidate_dir / "signals.json")
        extra = {"signals.json": signals}
        if (candidate_dir / PROFILE_FILE).is_file():
            extra[PROFILE_FILE] = read_json(candidate_dir / PROFILE_FILE)
        if options.recovery == "distill":
            from agent_prune.actions import side_tensors

            model, parsed = self.states.replay(candidate_dir)  # a fresh copy, healed in place
            gain = candidate["sparsity"] - previous_sparsity
            record["heal"] = self.builder.heal(model, parsed, share=gain / options.target_sparsity)
            record["signals_before_heal"] = signals
            signals = self.scoring.score(model)
            extra = {"signals.json": signals}  # the walk's profile describes the model before healing
            manifest, tensors = parsed.model_dump(mode="json"), side_tensors(model, parsed)
            self.states.remember(store.step_dir(step), model.eval(), parsed)
        store.commit(step, manifest, tensors, {**record, "decision": decision, "step": step},
                     sparsity=candidate["sparsity"], extra=extra)
        return store.step_dir(step), record.get("heal")
