"""What a run holds outside the graph state: the base model, planner, evaluator, model cache.

The graph's nodes call these methods; this is the one place where the agent meets the profiler,
the pruners, recovery and evaluation, so their APIs are wired here and nowhere else.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import cached_property, partial
from pathlib import Path

from torch import nn

from agent_prune.agent.options import RunOptions
from agent_prune.agent.trace import TraceWriter
from agent_prune.checkpoints.store import CheckpointStore, read_state_dir, write_state_dir
from agent_prune.errors import InputError
from agent_prune.io import atomic_write_json, read_json

REPORT_BATCH = 4  # sequences per forward in the report's evaluation (part of its cache key)


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
    # Replayed states kept in memory: the current step, which profile, build and the rebuild after a
    # rollback all read. Candidates are not kept (each is scored once, then replayed bit for bit if
    # accepted): holding them put up to four pruned copies beside the dense model (issue 16).
    MODEL_CACHE = 1

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
            seed=self.options.seed, model_name=self.options.model, gradients=self.options.profile_gradients,
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

        with self.trace.measure("phase", phase="load model"):
            base = self.base
        step_dir = self.store.step_dir(0)
        if not (step_dir / "signals.json").is_file():
            manifest = dense_manifest(base.model, fingerprint=base.source.fingerprint())
            self.reporter.finishing("scoring the dense model")
            with self.trace.measure("phase", phase="score dense") as fields:
                signals = self.dense_signals()
                fields["cached"] = signals.pop("cache", None) is not None
            self.store.commit(0, manifest.model_dump(mode="json"), {}, {"step": 0, "dense": True},
                              sparsity=0.0, extra={"signals.json": signals})
        counts = count_parameters(base.model)
        return {"dir": str(step_dir), "params": counts.total, "prunable": counts.prunable,
                "layers": base.adapter.num_layers, "record": str(step_dir / "signals.json")}

    def load_state(self, state_dir: Path):
        """(model, manifest) of a saved state, replayed onto the base model and cached."""
        key = str(Path(state_dir).resolve())
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model, manifest = self.replay_state(state_dir)
        self._remember(key, model, manifest)
        return model, manifest

    def replay_state(self, state_dir: Path):
        """(model, manifest) of a saved state, freshly replayed and not cached: the caller owns it.

        Replay equals the saved model bit for bit (``actions.replay``), so a candidate scored from
        its replay scores as the model that was built."""
        from agent_prune.actions import Manifest, replay

        manifest_json, tensors, _ = read_state_dir(Path(state_dir))
        manifest = Manifest.model_validate(manifest_json)
        return replay(self.base.model, manifest, tensors).eval(), manifest

    def release_states(self) -> None:
        """Drop the cached step models (the evaluate node scores candidates without them; a rollback
        replays the current step again, which costs seconds against minutes of scoring)."""
        self._models.clear()

    def _remember(self, key: str, model, manifest) -> None:
        self._models[key] = (model, manifest)
        while len(self._models) > self.MODEL_CACHE:
            self._models.popitem(last=False)

    def build_candidate(self, model, manifest, actions: list[dict], profile: dict, target: Path,
                        pruner: str = "l2") -> dict:
        """Apply ``actions`` to a copy of ``model`` (structures chosen by ``pruner``'s scores from
        ``profile``), recover it, and save it under ``target``; the copy is dropped on return (the
        evaluate node replays it)."""
        candidate, new_manifest, info = self.candidate_model(model, manifest, actions, profile, pruner)
        self.save_candidate(target, candidate, new_manifest, {"actions": actions, **info})
        return info

    def candidate_model(self, model, manifest, actions: list[dict], profile: dict, pruner: str = "l2"):
        """(candidate, its manifest, info): ``actions`` applied to a copy of ``model``, recovered."""
        from agent_prune.actions import apply_actions
        from agent_prune.agent.decisions import describe_actions
        from agent_prune.models.accounting import count_parameters
        from agent_prune.sensitivity.schema import SensitivityProfile

        candidate = copy.deepcopy(model)
        parsed = SensitivityProfile.model_validate(profile)
        if pruner == "taylor" and parsed.layers[0].structures_taylor is None:
            pruner = "l2"  # a run profiled without gradients has no Taylor scores; the record says so
        scores = dict(enumerate(parsed.structure_scores(pruner)))
        new_manifest = apply_actions(candidate, actions, manifest, scores=scores,
                                     protected=profile.get("protected", []))
        recovery = self.recover(candidate, new_manifest, first_changed=first_changed_layer(actions))
        counts = count_parameters(candidate, base_prunable=new_manifest.base.prunable_parameters)
        info = {"params": counts.total, "prunable": counts.prunable,
                "sparsity": round(counts.structural_sparsity, 6), "summary": describe_actions(actions),
                "pruner": pruner, "recovery": recovery}
        return candidate.eval(), new_manifest, info

    @staticmethod
    def save_candidate(target: Path, candidate, manifest, record: dict) -> None:
        from agent_prune.actions import side_tensors

        write_state_dir(target, manifest.model_dump(mode="json"), side_tensors(candidate, manifest), record)

    def recover(self, model, manifest, first_changed: int = 0) -> dict | None:
        """Local reconstruction of a candidate (``--recovery reconstruct``, the default): each cut
        layer's output projections refitted toward the dense sub-block on the candidate's own inputs.

        ``distill`` heals accepted steps instead and does not reconstruct candidates first."""
        if self.options.recovery != "reconstruct":
            return None
        from agent_prune.recovery import reconstruct

        # Every state the loop builds on was reconstructed on the same windows (or is dense), so
        # layers before this step's first change would refit to what they already hold.
        report = reconstruct(model, self.base.model, manifest, self.calibration,
                             first_changed=first_changed)  # marks overrides
        return {"method": "reconstruct", "seconds": round(report.seconds, 2),
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
            model, _ = self.replay_state(state_dir)
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

            model, parsed = self.replay_state(candidate_dir)  # a fresh copy, healed in place
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
        from agent_prune.models.formats import engines_that_load

        best = self.store.index().best or 0
        model, manifest = self.load_state(self.store.step_dir(best))
        self.reporter.finishing("exporting")
        gguf = self.options.export_format == "gguf"
        export_path = self.run_dir / ("model.gguf" if gguf else "model")
        with self.trace.measure("phase", phase="export"):
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
            "loads_in": engines_that_load(self.options.export_format, export["heterogeneous"]),
        }
        if gguf:
            # The dense model through the same writer and types: a like-for-like file and speed pair.
            from agent_prune.actions import dense_manifest

            dense_path = self.run_dir / "final" / "dense.gguf"
            dense = self._write(self.base.model, dense_manifest(self.base.model), dense_path)
            final["file_size"]["dense"] = dense["bytes"]
            final["gguf"] = {"dense": str(dense_path), "quant": export["quant"],
                             "quant_source": export["quant_source"], "architecture": export["architecture"]}
        if self.options.final_eval.windows > 0 and self.options.final_eval.tasks:
            final["evaluation"] = {"dense": self.final_evaluation(self.base.model, "dense"),
                                   "pruned": self.final_evaluation(model, f"step-{best:04d}")}
        if self.options.final_eval.speed:
            from agent_prune.evaluation.speed import measure_speed

            self.reporter.finishing("measuring speed")
            with self.trace.measure("phase", phase="speed"):
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
        """The report's tasks on the test protocol, kept per state so resume does not redo them.

        The dense model's figures also go to the content-addressed evaluation cache
        (``agent_prune.evaluation.cache``): a later run of the same model and protocol reads them."""
        path = self.run_dir / "final" / f"{name}.json"
        if path.is_file():
            return read_json(path)
        self.reporter.finishing(f"evaluating {name} on the test protocol")
        results = {}
        for task in self.options.final_eval.tasks:
            with self.trace.measure("phase", phase=f"final eval {name}: {task}"):
                if name == "dense":
                    results[task] = self.cached_dense_task(task)
                else:
                    results[task] = self.report_task(model, task)
        atomic_write_json(path, results)
        return results

    def dense_signals(self) -> dict:
        """The dense model's in-loop scores, from the evaluation cache when an earlier run of the same
        model, data and loop settings measured them."""
        from agent_prune.data.corpora import C4_FILE, WIKITEXT_FILES
        from agent_prune.data.tasks import FREEBASEQA_FILE
        from agent_prune.evaluation import cache

        compute = partial(self.score, self.base.model)
        data = cache.data_digest(self.data_dir, [WIKITEXT_FILES["validation"], FREEBASEQA_FILE, C4_FILE])
        if self.dense_digest is None or data is None:
            return compute()
        o = self.options
        protocol = {"task": "loop signals", "dtype": o.dtype, "device": self.device_kind,
                    "seqlen": o.seqlen, "eval_windows": o.eval_windows, "probe_limit": o.probe_limit,
                    "probe_offset": o.final_eval.freebaseqa_limit, "kl_windows": o.kl_windows,
                    "seed": o.seed}
        return cache.cached(cache.entry_key(self.dense_digest, data, protocol), protocol, compute)

    @property
    def device_kind(self) -> str:
        return next(self.base.model.parameters()).device.type

    def report_task(self, model, task: str) -> dict:
        """One task of the report's protocol; the seam where the test protocol is run (tests count
        its calls to show that the dense model is evaluated once per protocol)."""
        from agent_prune.evaluation.harness import run_tasks

        spec = self.options.final_eval
        return run_tasks(model, self.base.tokenizer, [task], self.data_dir, seqlen=spec.seqlen,
                         windows=spec.windows, limit=self.task_limit(task), batch_size=REPORT_BATCH,
                         progress=self.reporter)[task]

    def task_limit(self, task: str) -> int | None:
        spec = self.options.final_eval
        return {"wikitext2": None, "freebaseqa": spec.freebaseqa_limit}.get(task, spec.arc_limit)

    def cached_dense_task(self, task: str) -> dict:
        from agent_prune.evaluation import cache

        compute = partial(self.report_task, self.base.model, task)
        data = cache.data_digest(self.data_dir, cache.task_files(task))
        if self.dense_digest is None or data is None:
            return compute()
        spec = self.options.final_eval
        protocol = {"task": task, "dtype": self.options.dtype,
                    "device": self.device_kind, "batch_size": REPORT_BATCH,
                    **({"seqlen": spec.seqlen, "windows": spec.windows} if task == "wikitext2"
                       else {"limit": self.task_limit(task)})}
        return cache.cached(cache.entry_key(self.dense_digest, data, protocol), protocol, compute)

    @cached_property
    def dense_digest(self) -> str | None:
        from agent_prune.evaluation.cache import model_digest

        source = self.base.source
        return model_digest(source.kind, source.path, source.gguf_file)


def first_changed_layer(actions: list[dict]) -> int:
    """The first current layer whose weights or inputs ``actions`` change (after a removal, the layer
    that moves into the removed one's place)."""
    indices = [a["layer"] for a in actions if "layer" in a]
    indices += [i for a in actions for i in a.get("layers", [])]
    return min(indices, default=0)


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
