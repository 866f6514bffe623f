"""The evaluation on the real shared model, checked against plain transformers computed independently.

The reference loads the GGUF with plain ``AutoModelForCausalLM`` (not the package's loader) and scores
one sequence at a time (``labels=`` for perplexity, full forwards for answers): see
``bench/reference_eval.py``, which runs the same reference on the full 32 windows / 300 items.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent_prune.evaluation.harness import run_tasks
from agent_prune.evaluation.loop import LoopEvaluator, compare_records
from bench.reference_eval import (
    load_plain,
    reference_arc,
    reference_freebaseqa,
    reference_window_losses,
)
from tests.conftest import SHARED_DATA, SHARED_GGUF, require_shared

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plain():
    require_shared()
    return load_plain(SHARED_GGUF)


def test_cli_perplexity_matches_plain_transformers_labels_loss(plain):
    windows = 4
    result = subprocess.run(
        [sys.executable, "-m", "agent_prune", "eval", "--model", str(SHARED_GGUF), "--data-dir",
         str(SHARED_DATA), "--tasks", "wikitext2", "--seqlen", "512", "--windows", str(windows), "--json",
         "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)["wikitext2"]
    assert (entry["seqlen"], entry["windows"]) == (512, windows)

    model, tokenizer = plain
    losses = reference_window_losses(model, tokenizer, SHARED_DATA, 512, windows)
    reference = math.exp(sum(losses) / len(losses))
    # The bar is 1%; the two computations agree to float rounding, so hold them to 0.1%.
    assert entry["perplexity"] == pytest.approx(reference, rel=1e-3)
    assert entry["perplexity_se"] > 0


def test_freebaseqa_and_arc_match_plain_transformers(shared_model, plain):
    limit = 12
    ours = run_tasks(shared_model.model, shared_model.tokenizer, ["freebaseqa", "arc_easy"], SHARED_DATA,
                     limit=limit, per_item=True)
    model, tokenizer = plain
    ref_qa = reference_freebaseqa(model, tokenizer, SHARED_DATA, limit)
    qa = ours["freebaseqa"]["per_item"]
    assert qa["hit"] == ref_qa["hit"]
    assert qa["gold_loglik"] == pytest.approx(ref_qa["gold_loglik"], abs=2e-3)
    assert qa["mc_margin"] == pytest.approx(ref_qa["mc_margin"], abs=2e-3)
    ref_arc = reference_arc(model, tokenizer, SHARED_DATA, limit)
    assert ours["arc_easy"]["per_item"]["correct"] == ref_arc["correct"]
    assert ours["arc_easy"]["per_item"]["correct_norm"] == ref_arc["correct_norm"]


def test_loop_evaluator_calls_noise_a_tie_and_removed_layers_a_real_loss(shared_model):
    """Issue 10: equal quality up to noise is a tie; six removed layers are a detected difference."""
    dense = shared_model.model
    evaluator = LoopEvaluator(shared_model.tokenizer, SHARED_DATA, seqlen=512, ppl_windows=4,
                              probe_questions=60, kl_windows=1, reference_model=dense)
    noisy = copy.deepcopy(dense)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(1e-4 * p.std() * torch.randn(p.shape, generator=generator))
    pruned = copy.deepcopy(dense)
    adapter = type(shared_model.adapter)(pruned)
    adapter.keep_layers([i for i in range(adapter.num_layers) if i not in range(18, 24)])

    base, jitter, cut = (evaluator.score(m) for m in (dense, noisy, pruned))
    for metric in ("perplexity", "mc_margin"):
        assert compare_records(jitter, base, metric).verdict == "tie", metric
    assert compare_records(cut, base, "perplexity").verdict == "b"
    assert compare_records(cut, base, "kl").verdict == "b"
    assert base.kl.value < 1e-3 < cut.kl.value
