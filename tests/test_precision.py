"""The loop's compute dtype: autocast where modules run, float32 where statistics are taken."""

from __future__ import annotations

import copy

import pytest
import torch

from agent_prune.evaluation.loop import LoopEvaluator
from agent_prune.models.adapters import adapter_for
from agent_prune.models.precision import (
    autocast_forward,
    compute_dtype,
    evaluated_in,
    full_precision,
    native_bfloat16,
    pad_mlp_widths,
    resolve_compute_dtype,
)
from agent_prune.models.streaming import run_layer
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity.layerstats import attach_collectors
from tests.conftest import tiny_model, tiny_tokenizer
from tests.recovery.surgery import cut_mlp
from tests.tiny_data import write_data_dir

CPU = torch.device("cpu")


def windows(count: int = 24, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def test_auto_resolves_by_the_device_and_16_bit_weights_never_autocast():
    native = "bfloat16" if native_bfloat16("cpu") else "float32"
    assert resolve_compute_dtype("auto", "cpu", "float32") == native
    assert resolve_compute_dtype("bfloat16", "cpu", "float32") == "bfloat16"
    assert resolve_compute_dtype("float32", "cpu", "float32") == "float32"
    assert resolve_compute_dtype("bfloat16", "cpu", "bfloat16") == "float32"
    assert resolve_compute_dtype("auto", "cpu", "float16") == "float32"


def test_forwards_autocast_only_inside_the_block_and_statistics_stay_float32():
    x = torch.randn(8, 8)
    square, exact = full_precision(lambda a: a @ a), x @ x
    with autocast_forward(CPU):
        assert (x @ x).dtype == torch.float32  # nothing set: float32
    with compute_dtype("bfloat16"), autocast_forward(CPU):
        assert (x @ x).dtype == torch.bfloat16
        assert torch.equal(square(x), exact)
    with compute_dtype("float32"), autocast_forward(CPU):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="not concrete"), compute_dtype("auto"):
        pass


@torch.no_grad()
def test_collector_hooks_take_float32_products_of_a_bfloat16_layer():
    """A layer run in bfloat16 feeds its collectors bfloat16 activations; their Gram matrices are
    float32 products of those (a bfloat16 product would be off by about 1e-3)."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    layer = adapter.layers()[0]
    seen = {}
    down = adapter.mlp_projections(layer)["down_proj"]
    handle = down.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
    collectors, handles = attach_collectors(adapter, layer, hessian=True)
    hidden = torch.randn(2, 16, 64)
    position = torch.arange(16)[None].expand(2, -1)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position), "attention_mask": None,
              "position_ids": position}
    with compute_dtype("bfloat16"):
        run_layer(layer, hidden, kwargs)
    for h in [*handles, handle]:
        h.remove()
    x = seen["x"].reshape(-1, down.in_features)
    assert x.dtype == torch.bfloat16  # the layer did run in bfloat16
    gram = collectors["mlp.down_proj"].xtx
    assert torch.allclose(gram, (x.float().T @ x.float()).double(), rtol=1e-6, atol=1e-6)


def test_a_bfloat16_refit_fits_as_well_as_a_float32_one():
    dense = tiny_model("llama")
    pruned = cut_mlp(dense, 48)
    fp32, bf16 = copy.deepcopy(pruned), copy.deepcopy(pruned)
    exact = reconstruct(fp32, dense, range(4), windows())
    with compute_dtype("bfloat16"):
        fast = reconstruct(bf16, dense, range(4), windows())
    layer = adapter_for(bf16).mlp_projections(adapter_for(bf16).layers()[0])["down_proj"]
    assert layer.weight.dtype == torch.float32  # the weights keep their dtype
    changed = [not torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), bf16.state_dict().values())]
    assert any(changed)  # the walk did multiply in bfloat16
    for a, b in zip(exact.layers, fast.layers):
        assert b.fit_error_after < b.fit_error_before
        assert b.fit_error_after == pytest.approx(a.fit_error_after, rel=0.05, abs=1e-4)


def test_evaluated_in_casts_a_copy_or_an_owned_model_and_keeps_buffers_and_ties():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    frequencies = model.model.rotary_emb.inv_freq.clone()
    with evaluated_in(model) as same:
        assert same is model  # no compute dtype set: float32, no copy
    with compute_dtype("bfloat16"):
        with evaluated_in(model) as copied:
            assert copied is not model and {p.dtype for p in copied.parameters()} == {torch.bfloat16}
            assert copied.lm_head.weight is copied.model.embed_tokens.weight
            assert torch.equal(copied.model.rotary_emb.inv_freq, frequencies)  # buffers keep float32
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched
        with evaluated_in(model, owned=True) as cast:
            assert cast is model and model.lm_head.weight.dtype == torch.bfloat16


def test_a_copy_keeps_requires_grad_so_the_last_positions_head_is_one_product():
    model = cut_mlp(tiny_model("llama"), 40)  # padded in the copy
    model.lm_head.weight = model.model.embed_tokens.weight
    with compute_dtype("bfloat16"), evaluated_in(model) as copied:
        assert [p.requires_grad for p in copied.parameters()] == [True] * len(list(copied.parameters()))
        vocab, hidden = copied.lm_head.weight.shape
        ids = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(0))

        def head_expanded() -> bool:  # the head's weight copied once per row for a batched product
            with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
                copied(input_ids=ids, logits_to_keep=1)
            return any([4, hidden, vocab] in event.input_shapes for event in prof.events())

        assert not head_expanded()
        copied.lm_head.weight.requires_grad_(False)  # as the copy's parameters were before
        assert head_expanded()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_padded_mlp_widths_share_shapes_and_change_no_output(family):
    model = cut_mlp(tiny_model(family), 40)  # 40 channels kept in every layer
    adapter = adapter_for(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        pad_mlp_widths(model, multiple=64)
        after = model(input_ids=ids).logits
    for layer in adapter.layers():
        projections = adapter.mlp_projections(layer)
        assert projections["down_proj"].in_features == 64 == projections["gate_proj"].out_features
        assert projections["up_proj"].weight[40:].abs().sum() == 0
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)


def test_bfloat16_scores_track_float32_ones_and_still_see_damage(tmp_path):
    data_dir = write_data_dir(tmp_path)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    evaluator = LoopEvaluator(tokenizer, data_dir, seqlen=32, ppl_windows=4, probe_questions=12,
                              probe_offset=20, kl_windows=0, batch_size=4)
    exact = evaluator.score(model)
    damaged = copy.deepcopy(model)
    adapter_for(damaged).keep_layers([0])
    with compute_dtype("bfloat16"):
        with evaluated_in(model) as evaluated:
            fast = evaluator.score(evaluated)
        with evaluated_in(damaged, owned=True) as evaluated:
            worse = evaluator.score(evaluated)
    assert fast.window_nll != exact.window_nll  # the forwards did run in bfloat16
    assert fast.window_nll == pytest.approx(exact.window_nll, abs=0.02)
    assert fast.question_margin == pytest.approx(exact.question_margin, abs=0.1)
    assert worse.perplexity.value > fast.perplexity.value


def test_the_profile_command_profiles_in_the_compute_dtype_asked_for(tmp_path, capsys):
    import json

    from agent_prune.cli import main
    from tests.conftest import save_tiny

    model, data = save_tiny(tmp_path / "model"), write_data_dir(tmp_path / "data")
    profiles = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["profile", "--model", str(model), "--data-dir", str(data), "--calib-samples", "4",
                     "--seqlen", "32", "--no-gradients", "--compute-dtype", dtype, "--json", "--quiet"]) == 0
        profiles[dtype] = [layer["wanda"] for layer in json.loads(capsys.readouterr().out)["layers"]]
    assert profiles["bfloat16"] != profiles["float32"]  # the passes did multiply in bfloat16
    assert profiles["bfloat16"] == pytest.approx(profiles["float32"], rel=0.02)
