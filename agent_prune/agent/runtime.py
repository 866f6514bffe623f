"""What a run holds outside the graph state: the base model, planner, evaluator, model cache.

The graph's nodes call these methods; this is the one place where the agent meets the profiler,
the pruners, recovery and evaluation, so their APIs are wired here and nowhere else.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

from torch import nn

from agent_prune.agent.options import RunOptions
from agent_prune.agent.trace import TraceWriter
from agent_prune.checkpoints.store import CheckpointStore, read_state_dir, write_state_dir
from agent_prune.errors import InputError
from agent_prune.io import atomic_write_json, read_json


def planner_settings(options: RunOptions) -> dict:
    """The run options that configure the planner, as ``make_planner`` keywords."""
    clash = {"base_url", "timeout_s"} & set(options.planner_options)
    if clash:
        raise InputError(f"planner option {sorted(clash)[0]} has its own setting",
                         "use --planner-base-url / --planner-timeout (planner_base_url / "
                         "planner_timeout in a config file)")
    settings = {**options.planner_options, "timeout_s": options.planner_timeout}
    if options.planner_base_url:
        settings["base_url"] = options.planner_base_url
    return settings


class Reporter:
    """Progress callbacks for people watching a run; the default says nothing."""

    def started(self, options, dense: dict) -> None: ...
    def planning(self, iteration: int) -> None: ...
    def building(self, iteration: int, branch: str) -> None: ...
    def evaluating(self, iteration: int, branch: str) -> None: ...
    def decided(self, iteration: int, decision: dict, state: dict) -> None: ...
    def finishing(self, stage: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def task(self, description: str, total: int | None = None):
        """A callable ``advance(n=1)`` for long loops; the default ignores it."""
        return lambda n=1: None

    def close(self) -> None: ...


class RunContext:
    MODEL_CACHE = 3

    def __init__(self, options: RunOptions, reporter: Reporter | None = None):
        self.options = options
        self.run_dir = Path(options.out)
        self.reporter = reporter or Reporter()
        self.store = CheckpointStore(self.run_dir / "checkpoints")
        self.trace = TraceWriter(self.run_dir / "trace.jsonl")
        self._models: OrderedDict[str, tuple[nn.Module, dict]] = OrderedDict()

    # ---- lazily built resources ----------------------------------------------------------------
    @cached_property
    def base(self):
        from agent_prune.models.loading import load_model

        self.reporter.finishing("loading model")
        return load_model(self.options.model, device=self.options.device, dtype=self.options.dtype)

    @cached_property
    def data_dir(self):
        from agent_prune.data.sources import resolve_data_dir

        return resolve_data_dir(self.options.data_dir)

    @cached_property
    def planner(self):
        from agent_prune.agent.planners.spec import make_planner

        return make_planner(self.options.planner, notify=self.reporter.warn,
                            **planner_settings(self.options))

    @cached_property
    def calibration(self):
        """C4 windows for profiling and reconstruction (seeded; never an evaluation split)."""
        from agent_prune.data.corpora import c4_documents, calibration_windows

        docs = c4_documents(self.data_dir)
        return calibration_windows(self.base.tokenizer, docs, self.options.calib_samples,
                                   self.options.seqlen, seed=self.options.seed)

    @cached_property
    def evaluator(self):
        from agent_prune.evaluation.loop import LoopEvaluator

        return LoopEvaluator(
            self.base.tokenizer, self.data_dir, seqlen=self.options.seqlen,
            ppl_windows=self.options.eval_windows, probe_questions=self.options.probe_limit,
            probe_offset=self.options.final_eval.freebaseqa_limit, kl_windows=self.options.kl_windows,
            reference_model=self.base.model if self.options.kl_windows else None,
            seed=self.options.seed,
        )

    @property
    def hidden_size(self) -> int:
        return self.base.adapter.hidden_size

    @property
    def head_dim(self) -> int:
        return self.base.adapter.head_dim

    # ---- scoring and profiling ------------------------------------------------------------------
    def score(self, model) -> dict:
        self.evaluator.progress = self.reporter
        return self.evaluator.score(model).model_dump(mode="json")

    def profile(self, model, manifest) -> dict:
        from agent_prune.sensitivity import profile_model

        bars: dict[str, object] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = (self.reporter.task(f"profile: {stage}", total), 0)
            advance, seen = bars[stage]
            advance(done - seen)
            bars[stage] = (advance, done)

        profile = profile_model(
            model, self.calibration, device=self.options.device, progress=progress,
            layer_sources=[record.source for record in manifest.layers], dataset="c4",
            seed=self.options.seed, model_name=self.options.model,
        )
        return profile.model_dump(mode="json")

    @staticmethod
    def profile_rows(profile: dict) -> list[dict]:
        """The compact per-layer rows a planner sees."""
        protected_layers = {p["layer"] for p in profile.get("protected", []) if p["kind"] == "layer"}
        return [{
            "index": layer["index"], "source": layer["source"], "params": layer["params"],
            "heads": layer["num_heads"], "kv_heads": layer["num_kv_heads"],
            "mlp_channels": layer["intermediate_size"], "protected": layer["index"] in protected_layers,
            "z": {k: round(v, 3) for k, v in layer["z"].items() if v is not None},
        } for layer in profile["layers"]]

    def profile_table(self, profile: dict) -> list[dict]:
        return self.profile_rows(profile)

    def layer_sizes(self, model) -> list[dict]:
        from agent_prune.models.adapters import adapter_for

        adapter = adapter_for(model)
        sizes = []
        for index, layer in enumerate(adapter.layers()):
            widths = adapter.layer_widths(layer)
            params = sum(m.weight.numel() for m in adapter.linear_modules(layer).values())
            sizes.append({"index": index, "params": params, "num_heads": widths.num_heads,
                          "num_kv_heads": widths.num_kv_heads,
                          "mlp_channels": widths.intermediate_size})
        return sizes

    # ---- pruned states: a manifest + side tensors on disk, models in a small cache -------------
    def commit_dense(self) -> dict:
        from agent_prune.actions import dense_manifest
        from agent_prune.models.accounting import count_parameters

        base = self.base
        step_dir = self.store.step_dir(0)
        if not (step_dir / "signals.json").is_file():
            manifest = dense_manifest(base.model, fingerprint=base.source.fingerprint())
            self.reporter.finishing("scoring the dense model")
            signals = self.score(base.model)
            self.store.commit(0, manifest.model_dump(mode="json"), {}, {"step": 0, "dense": True},
                              sparsity=0.0, extra={"signals.json": signals})
        counts = count_parameters(base.model)
        return {"dir": str(step_dir), "params": counts.total, "prunable": counts.prunable,
                "layers": base.adapter.num_layers, "record": str(step_dir / "signals.json")}

    def load_state(self, state_dir: Path):
        """(model, manifest) of a saved state, replayed onto the base model and cached."""
        from agent_prune.actions import Manifest, replay

        key = str(Path(state_dir).resolve())
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        manifest_json, tensors, _ = read_state_dir(Path(state_dir))
        manifest = Manifest.model_validate(manifest_json)
        model = replay(self.base.model, manifest, tensors).eval()
        self._remember(key, model, manifest)
        return model, manifest

    def _remember(self, key: str, model, manifest) -> None:
        self._models[key] = (model, manifest)
        while len(self._models) > self.MODEL_CACHE:
            self._models.popitem(last=False)

    def build_candidate(self, model, manifest, actions: list[dict], profile: dict, target: Path) -> dict:
        """Apply ``actions`` to a copy of ``model``, recover it, and save it under ``target``."""
        from agent_prune.actions import apply_actions, side_tensors
        from agent_prune.agent.decisions import describe_actions
        from agent_prune.models.accounting import count_parameters

        candidate = copy.deepcopy(model)
        scores = {layer["index"]: layer["structures"] for layer in profile["layers"]}
        new_manifest = apply_actions(candidate, actions, manifest, scores=scores,
                                     protected=profile.get("protected", []))
        recovery = self.recover(candidate, new_manifest)
        counts = count_parameters(candidate, base_prunable=new_manifest.base.prunable_parameters)
        info = {"params": counts.total, "prunable": counts.prunable,
                "sparsity": round(counts.structural_sparsity, 6), "summary": describe_actions(actions),
                "recovery": recovery}
        write_state_dir(target, new_manifest.model_dump(mode="json"),
                        side_tensors(candidate, new_manifest), {"actions": actions, **info})
        self._remember(str(target.resolve()), candidate.eval(), new_manifest)
        return info

    def recover(self, model, manifest) -> dict | None:
        """Local reconstruction of a candidate (``--recovery reconstruct``), as MoP does.

        ``distill`` heals accepted steps only: on the shared model, reconstruction on the loop's 16 C4
        windows raised WikiText-2 perplexity of the loop's models (docs/benchmarks.md), so it is not
        stacked under healing."""
        if self.options.recovery != "reconstruct":
            return None
        from agent_prune.recovery import reconstruct

        report = reconstruct(model, self.base.model, manifest, self.calibration)  # marks overrides
        return {"method": "reconstruct", "mode": report.mode, "seconds": round(report.seconds, 2),
                "modules": len(report.overrides)}

    def heal(self, model, manifest, share: float) -> dict:
        """Distillation healing of an accepted state with ``share`` of the run's healing budget."""
        from agent_prune.recovery import HealSettings, heal
        from agent_prune.recovery.calibration import recovery_windows

        tokens = max(self.options.seqlen, int(self.options.heal_tokens * share))
        settings = HealSettings(max_tokens=tokens, max_seconds=max(1.0, self.options.heal_seconds * share),
                                seed=self.options.seed)
        windows, heldout = recovery_windows(self.base.tokenizer, self.data_dir, tokens=tokens,
                                            seqlen=self.options.seqlen)
        self.reporter.finishing(f"healing ({tokens} tokens at most)")
        report = heal(model, self.base.model, windows, settings, eval_windows=heldout,
                      manifest=manifest)  # marks the healed modules overridden
        return {"method": "distill", "tokens": report.tokens, "seconds": round(report.seconds, 1),
                "kl_before": report.kl_before, "kl_after": report.kl_after}

    def score_state(self, state_dir: Path) -> Path:
        path = Path(state_dir) / "signals.json"
        if not path.is_file():
            model, _ = self.load_state(state_dir)
            atomic_write_json(path, self.score(model))
        return path

    def accept(self, step: int, candidate_dir: Path, decision: dict, candidate: dict,
               previous_sparsity: float) -> tuple[Path, dict | None]:
        """Commit a candidate as step ``step``; with ``--recovery distill``, heal it first.

        Returns the step's directory and the healing report (None when nothing was healed)."""
        manifest, tensors, record = read_state_dir(candidate_dir)
        signals = read_json(candidate_dir / "signals.json")
        if self.options.recovery == "distill":
            from agent_prune.actions import side_tensors

            model, parsed = self.load_state(candidate_dir)
            model, parsed = copy.deepcopy(model), parsed.model_copy(deep=True)
            gain = candidate["sparsity"] - previous_sparsity
            record["heal"] = self.heal(model, parsed, share=gain / self.options.target_sparsity)
            record["signals_before_heal"] = signals
            signals = self.score(model)
            manifest, tensors = parsed.model_dump(mode="json"), side_tensors(model, parsed)
            self._remember(str(self.store.step_dir(step).resolve()), model.eval(), parsed)
        self.store.commit(step, manifest, tensors, {**record, "decision": decision, "step": step},
                          sparsity=candidate["sparsity"], extra={"signals.json": signals})
        return self.store.step_dir(step), record.get("heal")

    # ---- the end of a run -----------------------------------------------------------------------
    def finish(self, state: dict) -> dict:
        """Export the best accepted state, then measure dense vs pruned on the test protocol."""
        from agent_prune.models.accounting import count_parameters

        best = self.store.index().best or 0
        model, manifest = self.load_state(self.store.step_dir(best))
        self.reporter.finishing("exporting")
        gguf = self.options.export_format == "gguf"
        export_path = self.run_dir / ("model.gguf" if gguf else "model")
        export = self._write(model, manifest, export_path)
        dense_counts = count_parameters(self.base.model)
        pruned_counts = count_parameters(model, base_prunable=dense_counts.prunable)
        final = {
            "export": str(export_path), "export_format": self.options.export_format,
            "best_step": best,
            "params": {"dense": dense_counts.summary(), "pruned": pruned_counts.summary()},
            "mask_sparsity": pruned_counts.mask_sparsity,
            "file_size": {"dense": weight_bytes(self.base.model), "pruned": export["bytes"]},
            "layer_map": layer_map(manifest),
        }
        if gguf:
            # The dense model through the same writer and types: a like-for-like file and speed pair.
            from agent_prune.actions import dense_manifest

            dense_path = self.run_dir / "final" / "dense.gguf"
            dense = self._write(self.base.model, dense_manifest(self.base.model), dense_path)
            final["file_size"]["dense"] = dense["bytes"]
            final["gguf"] = {"dense": str(dense_path), "quant": export["quant"],
                             "quant_source": export["quant_source"], "architecture": export["architecture"]}
        if self.options.final_eval.windows > 0:
            final["evaluation"] = {"dense": self.final_evaluation(self.base.model, "dense"),
                                   "pruned": self.final_evaluation(model, f"step-{best:04d}")}
        if self.options.final_eval.speed:
            from agent_prune.evaluation.speed import measure_speed

            self.reporter.finishing("measuring speed")
            speed = measure_speed({"dense": self.base.model, "pruned": model})
            final["speed"] = {"dense": speed["dense"], "pruned": speed["pruned"],
                              "protocol": speed["protocol"]}
            if gguf:
                final["llama_cpp_speed"] = self.llama_cpp_speed(final["gguf"]["dense"], export_path)
        return final

    def _write(self, model, manifest, path: Path) -> dict:
        from agent_prune.models.formats import input_gguf, write_model

        return write_model(model, self.base.tokenizer, path, manifest, self.options.export_format,
                           self.options.export_quant, reference=input_gguf(self.options.model))

    def llama_cpp_speed(self, dense: str, pruned: Path) -> dict | None:
        """Dense vs pruned GGUF in llama.cpp (None, with a warning, without llama-cpp-python)."""
        from agent_prune.data.corpora import tokenize_text, wikitext2_text
        from agent_prune.evaluation import llamacpp

        try:
            llamacpp.require_llama_cpp()
        except InputError as exc:
            self.reporter.warn(f"no llama.cpp speed measurement: {exc.one_line()}")
            return None
        self.reporter.finishing("measuring speed in llama.cpp")
        prompt = tokenize_text(self.base.tokenizer, wikitext2_text(self.data_dir, "test"))
        return llamacpp.measure_speed({"dense": dense, "pruned": str(pruned)},
                                      prompt[: llamacpp.PROMPT_TOKENS].tolist())

    def final_evaluation(self, model, name: str) -> dict:
        """WikiText-2 test, FreebaseQA and ARC-Easy (cached per state, so resume does not redo it)."""
        from agent_prune.evaluation.harness import run_tasks

        path = self.run_dir / "final" / f"{name}.json"
        if path.is_file():
            return read_json(path)
        spec = self.options.final_eval
        self.reporter.finishing(f"evaluating {name} on the test protocol")
        results = {}
        for task, limit in (("wikitext2", None), ("freebaseqa", spec.freebaseqa_limit),
                            ("arc_easy", spec.arc_limit)):
            results |= run_tasks(model, self.base.tokenizer, [task], self.data_dir, seqlen=spec.seqlen,
                                 windows=spec.windows, limit=limit, progress=self.reporter)
        atomic_write_json(path, results)
        return results


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def layer_map(manifest) -> list[dict]:
    """Per ORIGINAL layer: kept or removed, and the share of heads and MLP channels kept."""
    kept = {record.source: record for record in manifest.layers}
    rows = []
    for source, widths in enumerate(manifest.base.widths):
        record = kept.get(source)
        rows.append({
            "source": source, "kept": record is not None,
            "heads_kept": len(record.heads) / widths.num_heads if record else 0.0,
            "mlp_kept": len(record.mlp_channels) / widths.intermediate_size if record else 0.0,
        })
    return rows
