"""In-loop scoring: one evaluator prepared once scores many candidate models on the same items.

Signals (see docs/signals.md for the measurements behind these roles):
- ``perplexity``: WikiText-2 *validation* windows (the test split stays for final reports).
- ``mc_accuracy`` / ``mc_margin``: FreebaseQA multiple choice on questions ``probe_offset`` onwards,
  disjoint from the first 300 that ``agent-prune eval --limit 300`` reports.
- ``kl``: ``KL(dense || candidate)`` on held-aside C4 windows (the last 100 of the 1000 local
  documents; calibration should draw from the others), when a reference model is given.

Each :class:`SignalRecord` keeps the per-item vectors, so two records compare by a paired test
(:func:`compare_records`) and a gate uses the same machinery (:func:`gate_records`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

from agent_prune.data.corpora import (
    c4_documents,
    calibration_windows,
    split_windows,
    tokenize_text,
    wikitext2_text,
)
from agent_prune.data.tasks import freebaseqa_items
from agent_prune.errors import InputError
from agent_prune.evaluation import knowledge
from agent_prune.evaluation.divergence import SpilledLogProbs, reference_log_probs, window_kl
from agent_prune.evaluation.perplexity import window_nlls
from agent_prune.evaluation.progress import NO_PROGRESS, Progress
from agent_prune.evaluation.stats import (
    Comparison,
    Estimate,
    Gate,
    compare_paired,
    gate_paired,
    mean_estimate,
    perplexity_estimate,
)

Metric = Literal["perplexity", "mc_accuracy", "mc_margin", "kl"]
# metric -> (per-item vector field, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "perplexity": ("window_nll", False),
    "mc_accuracy": ("question_correct", True),
    "mc_margin": ("question_margin", True),
    "kl": ("window_kl", False),
}
KL_HELD_ASIDE_DOCUMENTS = 100
PROBE_DISTRACTORS = 3
# Questions scored together: 4 questions' 15-20 continuations and their logits took 190 MiB at the
# loop's scoring peak, 8 took 320 MiB, in the same time on 2 cores (17-18 s for 120 questions).
PROBE_BATCH = 4


class SignalRecord(BaseModel):
    """A candidate's in-loop signals with error bars and the per-item vectors needed for pairing.

    The FreebaseQA probes are None when they were not run (``probes_skipped`` says why): a candidate
    that its perplexity alone already rules out is not probed (:meth:`LoopEvaluator.score`)."""

    perplexity: Estimate
    mc_accuracy: Estimate | None = None
    mc_margin: Estimate | None = None
    kl: Estimate | None = None
    window_nll: list[float]
    question_margin: list[float] | None = None
    question_correct: list[float] | None = None
    window_kl: list[float] | None = None
    probes_skipped: str | None = None
    items_key: str  # identifies the item set; records compare only when their keys match
    seconds: float


class LoopEvaluator:
    """Prepared once (data tokenised, reference log-probs cached), scores many models on the SAME items."""

    def __init__(
        self, tokenizer, data_dir: Path | None, *, seqlen: int = 512, ppl_windows: int = 16,
        probe_questions: int = 200, probe_offset: int = 300, kl_windows: int = 4,
        reference_model=None, seed: int = 0, batch_size: int = PROBE_BATCH, progress: Progress = NO_PROGRESS,
        spill_dir: Path | None = None,
    ):
        """``spill_dir``: where the KL reference goes instead of memory (read back a window at a time).
        ``batch_size``: FreebaseQA questions scored together."""
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.ppl_windows = split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "validation")),
                                         seqlen, ppl_windows)
        pool = freebaseqa_items(data_dir)
        self.probe_items = pool[probe_offset : probe_offset + probe_questions]
        if not self.probe_items:
            raise InputError(f"probe_offset {probe_offset} is past the {len(pool)} FreebaseQA questions",
                             "use a smaller probe offset")
        distractors = knowledge.draw_distractors(self.probe_items, pool, PROBE_DISTRACTORS, seed)
        self.probe_requests = knowledge.choice_requests(tokenizer, self.probe_items, distractors)
        self.kl_windows: torch.Tensor | None = None
        self.kl_reference: torch.Tensor | SpilledLogProbs | None = None
        if reference_model is not None and kl_windows > 0:
            held_aside = c4_documents(data_dir)[-KL_HELD_ASIDE_DOCUMENTS:]
            self.kl_windows = calibration_windows(tokenizer, held_aside, kl_windows, seqlen, seed)
            self.kl_reference = reference_log_probs(
                reference_model, self.kl_windows, batch_size=self._window_batch,
                advance=progress.task("reference log-probs", kl_windows), spill_dir=spill_dir)
        key = (f"{seqlen}:{self.ppl_windows.shape[0]}:{probe_offset}:{len(self.probe_items)}:"
               f"{seed}:{kl_windows if self.kl_windows is not None else 0}")
        self.items_key = hashlib.sha256(key.encode()).hexdigest()[:12]

    @property
    def _window_batch(self) -> int:
        # One full-length window at a time: [seqlen, vocab] logits are 100 MB at 512 x 49k, a batch of
        # 4 held 400 MB more at the run's peak. On CPU the logits are the same bits either way
        # (checked on the shared model, 1 and 2 threads), and batching bought no speed there.
        return 1

    def score(self, model, skip_probes: Callable[[SignalRecord], str | None] | None = None) -> SignalRecord:
        """``model``'s signals, in its own dtype (the run hands over a bfloat16 copy for a bfloat16
        compute dtype, :func:`agent_prune.models.precision.evaluated_in`; the KL reference should
        be in the same dtype). The softmaxes upcast the logits to float32.

        ``skip_probes(record)``: given the record with its perplexity alone, why the probes are not
        worth running (the loop's perplexity gates: a candidate they fail is never accepted), or None."""
        started = time.perf_counter()
        nll = window_nlls(model, self.ppl_windows, batch_size=self._window_batch,
                          advance=self.progress.task("perplexity (validation)", self.ppl_windows.shape[0]))
        record = SignalRecord(perplexity=perplexity_estimate(nll), window_nll=nll.tolist(),
                              items_key=self.items_key, seconds=0.0)
        skipped = skip_probes(record) if skip_probes is not None else None
        if skipped is None:
            scores = knowledge.choice_scores(
                model, self.tokenizer, self.probe_items, (), requests=self.probe_requests,
                batch_size=self.batch_size,
                advance=self.progress.task("FreebaseQA choices", len(self.probe_items)))
            record.mc_accuracy, record.mc_margin = mean_estimate(scores.correct), mean_estimate(scores.margin)
            record.question_margin, record.question_correct = scores.margin.tolist(), scores.correct.tolist()
        record.probes_skipped = skipped
        if self.kl_windows is not None:
            kl = window_kl(model, self.kl_windows, self.kl_reference, batch_size=self._window_batch,
                           advance=self.progress.task("KL to reference", self.kl_windows.shape[0]))
            record.kl, record.window_kl = mean_estimate(kl), kl.tolist()
        record.seconds = round(time.perf_counter() - started, 2)
        return record


def _paired_vectors(a: SignalRecord, b: SignalRecord, metric: str) -> tuple[list[float], list[float], bool]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    if a.items_key != b.items_key:
        raise ValueError("records were scored on different items; score both with the same LoopEvaluator")
    field, higher_is_better = METRICS[metric]
    va, vb = getattr(a, field), getattr(b, field)
    if va is None or vb is None:
        raise ValueError(f"metric '{metric}' is missing from a record (a reference model not given, "
                         "or the probes skipped)")
    return va, vb, higher_is_better


def compare_records(a: SignalRecord, b: SignalRecord, metric: Metric = "perplexity", *,
                    z_threshold: float = 2.0, min_effect: float = 0.0) -> Comparison:
    """Paired comparison of two records on one metric (perplexity compares mean per-window NLL);
    ``min_effect`` (per-item units) is the smallest difference that counts even when significant."""
    va, vb, higher_is_better = _paired_vectors(a, b, metric)
    return compare_paired(va, vb, metric=metric, higher_is_better=higher_is_better, z_threshold=z_threshold,
                          min_effect=min_effect)


def gate_records(candidate: SignalRecord, reference: SignalRecord, metric: Metric, *, max_loss: float,
                 z_threshold: float = 2.0) -> Gate:
    """Paired gate: fails only when ``candidate`` is worse than ``reference`` by significantly more
    than ``max_loss`` (per-item units: nats/token for perplexity, so ``log(1.1)`` allows +10%)."""
    va, vb, higher_is_better = _paired_vectors(candidate, reference, metric)
    return gate_paired(va, vb, metric=metric, higher_is_better=higher_is_better, max_loss=max_loss,
                       z_threshold=z_threshold)
