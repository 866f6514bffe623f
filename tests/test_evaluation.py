"""Evaluation on tiny random models: perplexity, cached continuation scoring, generation, KL, probes,
the in-loop evaluator, and paired decisions on real metric vectors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from agent_prune.data.tasks import QAItem
from agent_prune.errors import InputError
from agent_prune.evaluation import knowledge
from agent_prune.evaluation.divergence import position_kl, reference_log_probs, window_kl
from agent_prune.evaluation.harness import run_tasks
from agent_prune.evaluation.loop import LoopEvaluator, compare_records, gate_records
from agent_prune.evaluation.perplexity import mean_nll, perplexity, window_nlls
from agent_prune.evaluation.scoring import (
    LOGIT_POSITIONS,
    LOGPROB_ROWS,
    ScoringRequest,
    continuation_logliks,
    greedy_generate,
    token_logprobs,
)
from agent_prune.evaluation.stats import compare_paired
from agent_prune.evaluation.task_names import parse_tasks
from agent_prune.models.adapters import adapter_for
from tests.conftest import tiny_model, tiny_tokenizer
from tests.tiny_data import write_data_dir


def random_windows(count: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def test_perplexity_is_exp_of_hand_computed_mean_loss(family):
    model = tiny_model(family)
    windows = random_windows(5, 24)
    losses = []
    with torch.no_grad():
        for window in windows:
            logp = torch.log_softmax(model(window[None]).logits[0].float(), dim=-1)
            losses.append(-sum(float(logp[t, window[t + 1]]) for t in range(23)) / 23)
    estimate, nlls = perplexity(model, windows, batch_size=2)
    assert nlls.tolist() == pytest.approx(losses, abs=1e-5)
    assert estimate.value == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert estimate.n == 5 and estimate.se > 0


def test_losses_in_chunks_of_positions_give_the_bits_of_one_call():
    """A window's NLL and continuations' log-probabilities are taken a chunk at a time (no second
    copy of the logits); each position's value is the same operation and the mean is cross_entropy's
    own reduction, so the bits are those of one call, over several windows of random logits."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        logits = torch.randn(2 * LOGIT_POSITIONS + 37, 300, generator=gen) * 4
        targets = torch.randint(0, 300, (logits.shape[0],), generator=gen)
        assert torch.equal(mean_nll(logits, targets), F.cross_entropy(logits, targets))
        rows = torch.randn(2 * LOGPROB_ROWS + 3, 5, 300, generator=gen) * 4
        picked = torch.randint(0, 300, rows.shape[:2], generator=gen)
        whole = F.log_softmax(rows, dim=-1).gather(2, picked[:, :, None]).squeeze(2)
        assert torch.equal(token_logprobs(rows, picked), whole)


def test_cached_continuation_scores_equal_full_sequence_scores(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return tuple(torch.randint(1, 256, (n,), generator=gen).tolist())

    requests = [ScoringRequest(ids(3 + 2 * i), tuple(ids(1 + (i + j) % 4) for j in range(1 + i % 3)))
                for i in range(6)]
    scores = continuation_logliks(model, requests, pad_id=0, batch_size=4)
    with torch.no_grad():
        for request, got in zip(requests, scores):
            for continuation, value in zip(request.continuations, got):
                full = torch.tensor([request.context + continuation])
                logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
                start = len(request.context) - 1
                expected = sum(float(logp[start + k, t]) for k, t in enumerate(continuation))
                assert value == pytest.approx(expected, abs=1e-4)


def test_batched_greedy_generation_equals_one_by_one():
    model = tiny_model("llama", initializer_range=0.3)
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 5, 12)]
    batched = greedy_generate(model, prompts, pad_id=0, eos_id=None, max_new_tokens=6, batch_size=3)
    for prompt, got in zip(prompts, batched):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert got == single[0, len(prompt):].tolist()


def test_window_kl_is_zero_to_itself_and_matches_hand_computation():
    model, other = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    windows = random_windows(3, 16)
    reference = reference_log_probs(model, windows, batch_size=2)
    assert window_kl(model, windows, reference).abs().max() < 1e-3
    kl = window_kl(other, windows, reference, batch_size=2)
    with torch.no_grad():
        p = torch.log_softmax(model(windows).logits.float(), -1)
        q = torch.log_softmax(other(windows).logits.float(), -1)
        expected = (p.exp() * (p - q)).sum(-1).mean(-1)
    assert kl.tolist() == pytest.approx(expected.tolist(), rel=1e-2, abs=1e-4)
    assert (kl > 0).all()


def test_kl_in_chunks_of_positions_gives_the_bits_of_the_whole_window(tmp_path):
    """Windows longer than ``LOGIT_POSITIONS`` are scored a chunk of positions at a time (a quarter of
    the temporaries at 512 tokens); each position's KL is the same operation, so the same bits."""
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = random_windows(2, LOGIT_POSITIONS + 40)  # one whole chunk and a partial one
    reference = reference_log_probs(model, windows, batch_size=1)
    with torch.inference_mode():
        whole = torch.stack([position_kl(reference[i], other(windows[i : i + 1]).logits[0]).mean().double()
                             for i in range(2)])
    assert torch.equal(window_kl(other, windows, reference, batch_size=1), whole)
    spilled = reference_log_probs(model, windows, batch_size=1, spill_dir=tmp_path)  # read a chunk at a time
    assert torch.equal(window_kl(other, windows, spilled, batch_size=1), whole)
    spilled.close()


def test_a_spilled_kl_reference_gives_the_same_bits_and_leaves_no_file(tmp_path):
    """The loop keeps its KL reference in a file under the run folder (200 MB less resident on the
    shared model); read back a window at a time, it gives exactly the in-memory KL."""
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = random_windows(3, 16)
    in_memory = reference_log_probs(model, windows, batch_size=2)
    spilled = reference_log_probs(model, windows, batch_size=2, spill_dir=tmp_path)
    assert tuple(spilled.shape) == tuple(in_memory.shape) and len(spilled) == 3
    assert all(torch.equal(spilled[i], in_memory[i]) for i in range(3))
    assert all(torch.equal(spilled[i, part], in_memory[i, part])  # a chunk of positions reads just those
               for i in range(3) for part in (slice(0, 5), slice(5, 13), slice(13, None), slice(3, 3)))
    assert torch.equal(window_kl(other, windows, spilled, batch_size=2),
                       window_kl(other, windows, in_memory, batch_size=2))
    with pytest.raises(IndexError):
        spilled[3]
    with pytest.raises(ValueError, match="do not match"):
        window_kl(other, windows[:2], spilled)
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing to clean up after a crash
    spilled.close()


def test_exact_match_normalises_case_and_spaces():
    assert knowledge.is_hit("It is Salman  Rushdie, of course", ["salman rushdie"])
    assert knowledge.is_hit("SalmanRushdie", ["salman rushdie"])
    assert not knowledge.is_hit("Rushdie", ["salman rushdie"])
    assert not knowledge.is_hit("anything", [""])


def test_distractors_are_seeded_per_item_of_the_same_kind_and_never_gold():
    pool = [QAItem(f"q{i}", "?", (a,)) for i, a in enumerate(
        ["1969", "1977", "2001", "1815", "paris", "london", "rome", "new york", "los angeles", "red sea"])]
    drawn = knowledge.draw_distractors(pool, pool, 3, seed=0)
    assert drawn == knowledge.draw_distractors(pool, pool, 3, seed=0)
    assert drawn[:1] == knowledge.draw_distractors(pool[:1], pool, 3, seed=0)  # independent of the batch
    assert drawn != knowledge.draw_distractors(pool, pool, 3, seed=1)
    for item, wrong in zip(pool, drawn):
        assert len(set(wrong)) == 3 and item.answers[0] not in wrong
    assert all(w.isdigit() for w in drawn[0])  # a year gets years
    assert {"london", "rome"} <= set(drawn[4])  # 'paris' gets both other one-word names, then any other


def test_unknown_task_is_an_input_error():
    assert parse_tasks("wikitext2, arc_easy") == ["wikitext2", "arc_easy"]
    with pytest.raises(InputError, match="unknown task nope"):
        parse_tasks("wikitext2,nope")


def test_run_tasks_reports_every_figure_with_an_error_bar(tmp_path):
    data_dir = write_data_dir(tmp_path)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    results = run_tasks(model, tokenizer, ["wikitext2", "freebaseqa", "arc_easy"], data_dir, seqlen=32,
                        windows=3, limit=10, per_item=True)
    assert results["wikitext2"]["windows"] == 3 and results["wikitext2"]["seqlen"] == 32
    nlls = torch.tensor(results["wikitext2"]["per_item"]["window_nll"])
    assert results["wikitext2"]["perplexity"] == pytest.approx(math.exp(float(nlls.mean())))
    qa = results["freebaseqa"]
    assert qa["questions"] == 10 and qa["mc_choices"] == 4
    margins = torch.tensor(qa["per_item"]["mc_margin"])
    assert qa["mc_accuracy"] == pytest.approx(float((margins > 0).double().mean()))
    assert results["arc_easy"]["items"] == 10
    for entry in results.values():
        metrics = [k for k in entry if f"{k}_se" in entry]
        assert metrics and all(entry[f"{m}_se"] >= 0 for m in metrics)
        assert entry["dtype"] == "float32"
    halved = run_tasks(model.to(torch.bfloat16), tokenizer, ["wikitext2"], data_dir, seqlen=32, windows=3)
    assert halved["wikitext2"]["dtype"] == "bfloat16"


def test_loop_evaluator_scores_candidates_on_the_same_items(tmp_path):
    data_dir = write_data_dir(tmp_path)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    evaluator = LoopEvaluator(tokenizer, data_dir, seqlen=32, ppl_windows=4, probe_questions=12,
                              probe_offset=20, kl_windows=2, reference_model=model, batch_size=4)
    assert [q.id for q in evaluator.probe_items] == [f"q{i}" for i in range(20, 32)]
    dense = evaluator.score(model)
    assert len(dense.window_nll) == 4 and len(dense.question_margin) == 12 and len(dense.window_kl) == 2
    assert dense.kl.value < 1e-3
    damaged = copy.deepcopy(model)
    adapter_for(damaged).keep_layers([0])
    worse = evaluator.score(damaged)
    assert worse.kl.value > 100 * max(dense.kl.value, 1e-6)
    assert compare_records(worse, dense, "kl").verdict == "b"
    assert type(dense).model_validate_json(dense.model_dump_json()) == dense
    other = LoopEvaluator(tokenizer, data_dir, seqlen=32, ppl_windows=3, probe_questions=12, probe_offset=20)
    with pytest.raises(ValueError, match="different items"):
        compare_records(other.score(model), dense)
    assert gate_records(dense, dense, "perplexity", max_loss=0.0).passed
    seen = []  # what the question saw, copied when asked
    ruled = evaluator.score(damaged, skip_probes=lambda partial: seen.append(partial.model_copy(deep=True))
                            or "too far gone")
    assert seen[0].window_nll == worse.window_nll and seen[0].mc_margin is None  # asked before probing
    probed = evaluator.score(damaged, skip_probes=lambda partial: seen.append(partial.model_copy(deep=True)))
    assert seen[1].mc_margin is None and probed.mc_margin is not None  # asked before probing here too
    assert ruled.probes_skipped == "too far gone"
    assert ruled.mc_accuracy is None and ruled.question_margin is None
    assert ruled.window_nll == worse.window_nll and ruled.window_kl == worse.window_kl
    with pytest.raises(ValueError, match="probes skipped"):
        compare_records(ruled, dense, "mc_margin")
    assert probed.model_dump(exclude={"seconds"}) == worse.model_dump(exclude={"seconds"})


def sampled_windows(model, count: int, length: int) -> torch.Tensor:
    """Token windows sampled from ``model`` itself, so its perplexity on them is meaningfully low."""
    torch.manual_seed(1)
    start = torch.randint(0, 256, (count, 1))
    return model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                          temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1)


def test_equal_quality_up_to_noise_is_a_tie_and_damage_is_a_real_difference():
    """Issue 10: paired decisions on real per-window NLL vectors from real (tiny) models."""
    model = tiny_model("llama", initializer_range=0.3)
    windows = sampled_windows(model, 16, 64)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(1e-4 * p.std() * torch.randn_like(p))
    damaged = copy.deepcopy(model)
    adapter_for(damaged).keep_layers([0, 3])
    base, jitter, broken = (window_nlls(m, windows) for m in (model, noisy, damaged))
    assert not torch.equal(base, jitter)  # the noise does change every window's NLL
    tie = compare_paired(jitter, base, metric="perplexity", higher_is_better=False)
    assert tie.verdict == "tie"
    assert tie.decide(size_a=100, size_b=100) == "a"
    real = compare_paired(broken, base, metric="perplexity", higher_is_better=False)
    assert real.verdict == "b" and real.z > 10
    assert F.l1_loss(base, jitter) < 1e-3
