"""Measuring models: the loop's signals, the report's test protocol, and the dense model's figures
and sensitivity profile through the content-addressed evaluation cache
(``agent_prune.evaluation.cache``), so a later run of the same model and protocol reads them
instead of measuring again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import cached_property, partial

from torch import nn

from agent_prune.agent.resources import RunResources
from agent_prune.models.precision import casts, evaluated_in

REPORT_BATCH = 4  # sequences per forward in the report's evaluation (part of its cache key)
# WikiText-2 windows go one at a time: a batch of 4 held [4, 512, 49152] logits, 300 MiB more at the
# run's peak, and on CPU it gave the same bits in the same time (45.8 s against 45.2 s for 32
# windows of the shared model; docs/benchmarks.md, "Heap settings").
REPORT_WINDOW_BATCH = 1


def report_batch(task: str) -> int:
    return REPORT_WINDOW_BATCH if task == "wikitext2" else REPORT_BATCH


class Scoring:
    def __init__(self, resources: RunResources):
        self.resources = resources

    @cached_property
    def evaluator(self):
        from agent_prune.evaluation.loop import LoopEvaluator

        r, o = self.resources, self.resources.options
        reference = evaluated_in(r.base.model) if o.kl_windows else contextlib.nullcontext()
        with r.computing(), reference as reference:  # in the candidates' dtype
            return LoopEvaluator(
                r.base.tokenizer, r.data_dir, seqlen=o.seqlen,
                ppl_windows=o.eval_windows, probe_questions=o.probe_limit,
                probe_offset=o.final_eval.freebaseqa_limit, kl_windows=o.kl_windows,
                reference_model=reference,
                seed=o.seed, spill_dir=r.run_dir,  # the KL reference: 200 MB off the run's resident set
            )

    def score(self, model: nn.Module, owned: bool = False,
              against: tuple[dict, dict] | None = None) -> dict:
        """The loop's signals of ``model`` (what the gates and the planner read), measured in the
        run's compute dtype; ``owned``: the caller gives ``model`` up, so it may be cast in place.
        ``against``: the (current, dense) records of a candidate's step; a candidate whose perplexity
        already fails their gates is never accepted, so its probes are skipped."""
        evaluator = self.evaluator
        evaluator.progress = self.resources.reporter
        skip = None
        if against is not None:
            from agent_prune.agent.decisions import ruled_out
            from agent_prune.evaluation.loop import SignalRecord

            current, dense = (SignalRecord.model_validate(record) for record in against)
            skip = partial(ruled_out, current=current, dense=dense, gates=self.resources.options.gates)
        with self.computed(model, owned) as evaluated:
            return evaluator.score(evaluated, skip_probes=skip).model_dump(mode="json")

    @contextlib.contextmanager
    def computed(self, model: nn.Module, owned: bool = False) -> Iterator[nn.Module]:
        """``model`` in the run's compute dtype (``precision.evaluated_in``; ``owned``: the caller
        gives ``model`` up, so it may be cast in place)."""
        with self.resources.computing(), evaluated_in(model, owned=owned) as evaluated:
            yield evaluated

    def reported(self, model: nn.Module, owned: bool = False) -> contextlib.AbstractContextManager:
        """``model`` as the report's tasks multiply it (``final_eval.dtype``): as stored, so its figures
        stay comparable with other tools' and runs'; or, with ``compute``, as candidates are scored."""
        if self.resources.options.final_eval.dtype == "weights":
            return contextlib.nullcontext(model)
        return self.computed(model, owned)

    def report_casts(self, model: nn.Module) -> bool:
        """Whether :meth:`reported` gives a compute-dtype cast of ``model`` (a copy, or ``model`` cast
        in place) rather than ``model`` as stored."""
        if self.resources.options.final_eval.dtype == "weights":
            return False
        with self.resources.computing():
            return casts(model)

    def report_task(self, model: nn.Module, task: str) -> dict:
        """One task of the report's protocol on ``model`` as :meth:`reported` gives it; the seam where
        the test protocol is run (tests count its calls to show that the dense model is evaluated
        once per protocol)."""
        from agent_prune.evaluation.harness import run_tasks

        r, spec = self.resources, self.resources.options.final_eval
        return run_tasks(model, r.base.tokenizer, [task], r.data_dir, seqlen=spec.seqlen,
                         windows=spec.windows, limit=self.task_limit(task), batch_size=report_batch(task),
                         progress=r.reporter)[task]

    def task_limit(self, task: str) -> int | None:
        spec = self.resources.options.final_eval
        return {"wikitext2": None, "freebaseqa": spec.freebaseqa_limit}.get(task, spec.arc_limit)

    # ---- the dense model's figures, cached by model, data and protocol --------------------------
    def dense_signals(self) -> dict:
        """The dense model's in-loop scores, from the cache when an earlier run of the same model,
        data and loop settings measured them."""
        from agent_prune.data.corpora import C4_FILE, WIKITEXT_FILES
        from agent_prune.data.tasks import FREEBASEQA_FILE

        o = self.resources.options
        protocol = {"task": "loop signals", "dtype": o.dtype, "compute_dtype": self.resources.compute_dtype,
                    "device": self.device_kind,
                    # offloaded layers are scored as stored, whole models on a compute-dtype copy
                    "offloaded": self.resources.base.offload is not None,
                    "seqlen": o.seqlen, "eval_windows": o.eval_windows, "probe_limit": o.probe_limit,
                    "probe_offset": o.final_eval.freebaseqa_limit, "kl_windows": o.kl_windows,
                    "seed": o.seed}
        return self._cached([WIKITEXT_FILES["validation"], FREEBASEQA_FILE, C4_FILE], protocol,
                            partial(self.score, self.resources.base.model))

    def dense_task(self, task: str, reported: nn.Module) -> dict:
        """The dense model's figures on one report task, from the cache where they were measured, else
        measured on ``reported`` (the dense model as :meth:`reported` gives it)."""
        from agent_prune.evaluation.cache import task_files

        r, spec = self.resources, self.resources.options.final_eval
        # a compute-dtype report runs a bfloat16 copy, except of offloaded layers (scored as stored)
        copy = {"report_in": r.compute_dtype, "offloaded": r.base.offload is not None}
        protocol = {"task": task, "dtype": r.options.dtype,
                    "device": self.device_kind, "batch_size": report_batch(task),
                    **({"seqlen": spec.seqlen, "windows": spec.windows} if task == "wikitext2"
                       else {"limit": self.task_limit(task)}),
                    **(copy if spec.dtype == "compute" else {})}
        return self._cached(task_files(task), protocol, partial(self.report_task, reported, task))

    def dense_profile(self, compute: Callable[[], dict]) -> tuple[dict, bool]:
        """(the dense model's sensitivity profile, whether it came from the cache): ``compute()``,
        unless an earlier run of the same model, calibration and profiling code measured it; every
        target of a model starts from the same one (40 s of the shared model's run on 2 cores)."""
        from agent_prune.data.corpora import C4_FILE
        from agent_prune.evaluation.cache import PROFILE_SOURCES

        r, o = self.resources, self.resources.options
        protocol = {"task": "sensitivity profile", "dtype": o.dtype, "compute_dtype": r.compute_dtype,
                    "device": self.device_kind,
                    "offloaded": r.base.offload is not None, "calib_samples": o.calib_samples,
                    "seqlen": o.calib_seqlen, "seed": o.seed, "gradients": o.profile_gradients,
                    "hessians": o.profile_hessians}
        profile = self._cached([C4_FILE], protocol, compute, sources=PROFILE_SOURCES)
        cached = profile.pop("cache", None) is not None
        if cached:
            profile["model"]["name"] = o.model  # the rest is the model's content, not its path
        return profile, cached

    def _cached(self, files: list[str], protocol: dict, compute: Callable[[], dict],
                sources: tuple[str, ...] | None = None) -> dict:
        """``compute()`` through the cache; measured afresh where the model or data has no digest.
        ``sources``: the code that computes it (default: the evaluation code)."""
        from agent_prune.evaluation import cache

        data = cache.data_digest(self.resources.data_dir, files)
        if self.dense_digest is None or data is None:
            return compute()
        key = cache.entry_key(self.dense_digest, data, protocol, sources or cache.CODE_SOURCES)
        return cache.cached(key, protocol, compute)

    @property
    def device_kind(self) -> str:
        return next(self.resources.base.model.parameters()).device.type

    @cached_property
    def dense_digest(self) -> str | None:
        from agent_prune.evaluation.cache import model_digest

        source = self.resources.base.source
        return model_digest(source.kind, source.path, source.gguf_file)
