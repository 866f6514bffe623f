"""The end of a run: export the best accepted state, then measure dense vs pruned (parameters, file
size, the report's test protocol, speed) for the report."""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from agent_prune.actions import Manifest
from agent_prune.agent.resources import RunResources
from agent_prune.agent.scoring import Scoring
from agent_prune.agent.states import ModelStates
from agent_prune.errors import InputError
from agent_prune.io import atomic_write_json, read_json


def layer_map(manifest: Manifest) -> list[dict]:
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


class FinalReport:
    def __init__(self, resources: RunResources, scoring: Scoring, states: ModelStates):
        self.resources = resources
        self.scoring = scoring
        self.states = states

    def finish(self) -> dict:
        """Export the best accepted state, then measure dense vs pruned on the test protocol."""
        r, spec = self.resources, self.resources.options.final_eval
        best = self.states.store.index().best or 0
        model, manifest = self.states.load(self.states.store.step_dir(best))
        r.reporter.finishing("exporting")
        export_path = r.run_dir / ("model.gguf" if self.gguf else "model")
        with r.trace.measure("phase", phase="export"):
            export = self.write(model, manifest, export_path)
        final = {"export": str(export_path), "export_format": r.options.export_format,
                 "best_step": best, **self.sizes(model, manifest, export)}
        if self.gguf:
            final["file_size"]["dense"], final["gguf"] = self.dense_gguf(export)
        if spec.speed and r.base.offload is not None:
            r.reporter.warn(f"no speed measurement: the decoder layers are offloaded ({r.base.offload})")
            final["speed_skipped"] = f"decoder layers offloaded ({r.base.offload})"
        elif spec.speed:
            dense_gguf = final["gguf"]["dense"] if self.gguf else None
            final.update(self.speed(model, dense_gguf, export_path))
        if spec.windows > 0 and spec.tasks:
            # Its replay is dropped from the step cache, so it is the report's alone: a compute-dtype
            # report casts it in place instead of holding a copy beside it.
            self.states.release()
            pruned = self.evaluation(model, f"step-{best:04d}", owned=True)
            del model
            final["evaluation"] = {"dense": self.evaluation(r.base.model, "dense"), "pruned": pruned}
        return final

    @property
    def gguf(self) -> bool:
        return self.resources.options.export_format == "gguf"

    def sizes(self, model: nn.Module, manifest: Manifest, export: dict) -> dict:
        """Dense vs pruned parameters and file size, the layer map, and the engines that load it."""
        from agent_prune.models.accounting import count_parameters, weight_bytes
        from agent_prune.models.formats import engines_that_load

        base = self.resources.base.model
        dense_counts = count_parameters(base)
        pruned_counts = count_parameters(model, base_prunable=dense_counts.prunable)
        return {
            "params": {"dense": dense_counts.summary(), "pruned": pruned_counts.summary()},
            "mask_sparsity": pruned_counts.mask_sparsity,
            "file_size": {"dense": weight_bytes(base), "pruned": export["bytes"]},
            "layer_map": layer_map(manifest),
            "loads_in": engines_that_load(self.resources.options.export_format, export["heterogeneous"],
                                          export.get("extra_biases", False)),  # GGUF: Llama only
        }

    def dense_gguf(self, export: dict) -> tuple[int, dict]:
        """The dense model through the same writer and types: a like-for-like file and speed pair.

        Returns its size and the report's ``gguf`` entry."""
        from agent_prune.actions import dense_manifest

        base = self.resources.base.model
        dense_path = self.resources.run_dir / "final" / "dense.gguf"
        dense = self.write(base, dense_manifest(base), dense_path)
        return dense["bytes"], {"dense": str(dense_path), "quant": export["quant"],
                                "quant_source": export["quant_source"],
                                "architecture": export["architecture"]}

    def write(self, model: nn.Module, manifest: Manifest, path: Path) -> dict:
        from agent_prune.models.formats import input_gguf, write_model

        o = self.resources.options
        return write_model(model, self.resources.base.tokenizer, path, manifest, o.export_format,
                           o.export_quant, reference=input_gguf(o.model))

    def speed(self, model: nn.Module, dense_gguf: str | None, export_path: Path) -> dict:
        """Dense vs pruned speed in torch, and in llama.cpp for a GGUF export."""
        from agent_prune.evaluation.speed import measure_speed

        r = self.resources
        r.reporter.finishing("measuring speed")
        with r.trace.measure("phase", phase="speed"):
            speed = measure_speed({"dense": r.base.model, "pruned": model})
        result: dict = {"speed": {"dense": speed["dense"], "pruned": speed["pruned"],
                                  "protocol": speed["protocol"]}}
        if dense_gguf is not None:
            result["llama_cpp_speed"] = self.llama_cpp_speed(dense_gguf, export_path)
        return result

    def llama_cpp_speed(self, dense: str, pruned: Path) -> dict | None:
        """Dense vs pruned GGUF in llama.cpp (None, with a warning, without llama-cpp-python or with
        a build that cannot run the file)."""
        from agent_prune.data.corpora import tokenize_text, wikitext2_text
        from agent_prune.evaluation import llamacpp

        r = self.resources
        try:
            llamacpp.check_engine(pruned)
        except InputError as exc:
            r.reporter.warn(f"no llama.cpp speed measurement: {exc.one_line()}")
            return None
        r.reporter.finishing("measuring speed in llama.cpp")
        prompt = tokenize_text(r.base.tokenizer, wikitext2_text(r.data_dir, "test"))
        return llamacpp.measure_speed({"dense": dense, "pruned": str(pruned)},
                                      prompt[: llamacpp.PROMPT_TOKENS].tolist())

    def evaluation(self, model: nn.Module, name: str, owned: bool = False) -> dict:
        """The report's tasks on the test protocol, kept per state so resume does not redo them; the
        dense model's through the evaluation cache (``Scoring.dense_task``). ``owned``: the caller
        gives ``model`` up (``Scoring.reported``)."""
        r = self.resources
        path = r.run_dir / "final" / f"{name}.json"
        if path.is_file():
            return read_json(path)
        r.reporter.finishing(f"evaluating {name} on the test protocol")
        results = {}
        # A cast is a measured stretch of its own, so it starts on a trimmed heap (trace.measure):
        # the dense pages the speed phase read leave the resident set before it.
        casting = contextlib.nullcontext()
        if self.scoring.report_casts(model):
            casting = r.trace.measure("phase", phase=f"final eval {name}: cast")
        with contextlib.ExitStack() as stack:
            with casting:
                reported = stack.enter_context(self.scoring.reported(model, owned=owned))
            for task in r.options.final_eval.tasks:
                with r.trace.measure("phase", phase=f"final eval {name}: {task}"):
                    if name == "dense":
                        results[task] = self.scoring.dense_task(task, reported)
                    else:
                        results[task] = self.scoring.report_task(reported, task)
        atomic_write_json(path, results)
        return results
