"""Run named evaluation tasks on a model and return JSON-ready figures, each with its standard error.

Used by ``agent-prune eval`` and by reports and benchmarks. Every task entry holds its metrics
(``<metric>`` and ``<metric>_se``), its item count, the ``dtype`` the model's weights and forwards
were in, and a ``protocol`` string naming data, split, prompt and scoring, so a figure is never
separated from how it was made.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from agent_prune.data.corpora import split_windows, tokenize_text, wikitext2_text
from agent_prune.data.tasks import choice_items, freebaseqa_items
from agent_prune.evaluation import knowledge
from agent_prune.evaluation.multiple_choice import choice_accuracy
from agent_prune.evaluation.perplexity import perplexity
from agent_prune.evaluation.progress import NO_PROGRESS, Progress
from agent_prune.evaluation.stats import Estimate, mean_estimate
from agent_prune.evaluation.task_names import parse_tasks

FREEBASEQA_DISTRACTORS = 3
DISTRACTOR_SEED = 0
# Exact-match prompts are short (about 30 tokens) and decode 16 tokens one at a time, so a batch of 32
# keeps the cores busy where 16 did not: 128 of the shared model's generations took 18.0 s against
# 23.9 s at 16 and 18.4 s at 64 on 2 cores, while the batch's key-value cache, grown a token at a
# time, held 300 MiB at 32, 100 MiB at 16 and 560 MiB at 64 (docs/benchmarks.md, "Trimming the heap").
GENERATION_BATCH = 32


def figures(**estimates: Estimate) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, estimate in estimates.items():
        out[name] = estimate.value
        out[f"{name}_se"] = estimate.se
    return out


def run_tasks(
    model, tokenizer, tasks: Sequence[str], data_dir: Path | None, *, seqlen: int = 512,
    windows: int | None = None, limit: int | None = None, batch_size: int = 4,
    progress: Progress = NO_PROGRESS, per_item: bool = False,
) -> dict[str, dict]:
    """Evaluate ``model`` on ``tasks``; ``windows`` caps WikiText-2 windows, ``limit`` caps items.

    With ``per_item`` each entry also holds ``per_item``: the per-window / per-question vectors, for
    paired comparisons between models evaluated on the same items.
    """
    results = {}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # what the forwards multiplied in
    for task in parse_tasks(tasks):
        if task == "wikitext2":
            results[task] = wikitext2_task(model, tokenizer, data_dir, seqlen=seqlen, windows=windows,
                                           batch_size=batch_size, progress=progress, per_item=per_item)
        elif task == "freebaseqa":
            results[task] = freebaseqa_task(model, tokenizer, data_dir, limit=limit,
                                            batch_size=batch_size, progress=progress, per_item=per_item)
        else:
            results[task] = choice_task(task, model, tokenizer, data_dir, limit=limit,
                                        batch_size=batch_size, progress=progress, per_item=per_item)
        results[task]["dtype"] = dtype
    return results


def wikitext2_task(model, tokenizer, data_dir, *, seqlen, windows, batch_size, progress, per_item) -> dict:
    ids = split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "test")), seqlen, windows)
    started = time.perf_counter()
    ppl, nlls = perplexity(model, ids, batch_size=batch_size,
                           advance=progress.task("wikitext2 perplexity", ids.shape[0]))
    seconds = time.perf_counter() - started
    entry = {
        **figures(perplexity=ppl, nll=mean_estimate(nlls)),
        "seqlen": seqlen, "windows": int(ids.shape[0]), "tokens": int(ids.numel()),
        "seconds": round(seconds, 2), "tokens_per_s": round(ids.numel() / seconds, 1),
        "protocol": (f"WikiText-2 raw test, rows joined by '\\n\\n', tokenised once, first {ids.shape[0]} "
                     f"non-overlapping {seqlen}-token windows; ppl = exp(mean next-token NLL); "
                     "se by the delta method over windows"),
    }
    if per_item:
        entry["per_item"] = {"window_nll": nlls.tolist()}
    return entry


def freebaseqa_task(model, tokenizer, data_dir, *, limit, batch_size, progress, per_item) -> dict:
    pool = freebaseqa_items(data_dir)
    items = pool[:limit] if limit is not None else pool
    hits, texts = knowledge.exact_match(model, tokenizer, items, batch_size=max(batch_size, GENERATION_BATCH),
                                        advance=progress.task("freebaseqa exact match", len(items)))
    distractors = knowledge.draw_distractors(items, pool, FREEBASEQA_DISTRACTORS, DISTRACTOR_SEED)
    scores = knowledge.choice_scores(model, tokenizer, items, distractors, batch_size=batch_size * 2,
                                     advance=progress.task("freebaseqa choices", len(items)))
    entry = {
        **figures(exact_match=mean_estimate(hits), gold_loglik=mean_estimate(scores.gold_loglik),
                  mc_accuracy=mean_estimate(scores.correct), mc_margin=mean_estimate(scores.margin)),
        "questions": len(items), "mc_choices": FREEBASEQA_DISTRACTORS + 1,
        "distractor_seed": DISTRACTOR_SEED,
        "protocol": ("FreebaseQA dev, first N questions. exact_match: LLM-KICK prompt "
                     f"{knowledge.PROMPT!r} (generation starts after its trailing space), greedy, "
                     f"{knowledge.MAX_NEW_TOKENS} new tokens, hit if an "
                     "alias (lowercased, spaces removed) is in the output. gold_loglik: sum log p of "
                     "' '+alias after prompt.rstrip(), best alias (nats). mc_*: gold vs "
                     f"{FREEBASEQA_DISTRACTORS} distractors (other questions' answers of the same kind, "
                     f"seed {DISTRACTOR_SEED}); margin = gold LL - best distractor LL. se over questions"),
    }
    if per_item:
        entry["per_item"] = {"hit": hits.tolist(), "gold_loglik": scores.gold_loglik.tolist(),
                             "mc_margin": scores.margin.tolist(), "output": texts}
    return entry


def choice_task(task, model, tokenizer, data_dir, *, limit, batch_size, progress, per_item) -> dict:
    items = choice_items(task, data_dir, limit)
    result = choice_accuracy(model, tokenizer, items, batch_size=batch_size * 2,
                             advance=progress.task(f"{task} choices", len(items)))
    entry = {
        **figures(acc=mean_estimate(result.correct), acc_norm=mean_estimate(result.correct_norm)),
        "items": len(items),
        "protocol": (f"{task}, first N items; prompt 'Question: {{q}}\\nAnswer:', continuation ' '+choice; "
                     "acc = argmax summed log-likelihood, acc_norm = argmax log-likelihood / choice "
                     "length in UTF-8 bytes; se over items"),
    }
    if per_item:
        entry["per_item"] = {"correct": result.correct.tolist(), "correct_norm": result.correct_norm.tolist()}
    return entry
