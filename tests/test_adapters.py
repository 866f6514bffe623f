import pytest
import torch

from agent_prune.errors import UnsupportedModelError
from agent_prune.models.accounting import count_parameters
from agent_prune.models.adapters import adapter_class_for, adapter_for
from tests.conftest import tiny_model


def test_adapter_reads_widths_from_tensors(family):
    adapter = adapter_for(tiny_model(family))
    widths = adapter.layer_widths(adapter.layers()[0])
    assert (widths.num_heads, widths.num_kv_heads, widths.intermediate_size) == (4, 2, 96)
    assert adapter.head_dim == 16
    assert set(adapter.linear_modules(adapter.layers()[0])) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }


def test_keep_layers_renumbers_and_updates_config(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    kept = [adapter.layers()[i] for i in (0, 2, 3)]
    adapter.keep_layers([0, 2, 3])
    assert list(adapter.layers()) == kept
    assert model.config.num_hidden_layers == 3
    assert [adapter.attention(layer).layer_idx for layer in adapter.layers()] == [0, 1, 2]
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 3
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        adapter_class_for("gpt2")


def test_parameter_counts_use_one_definition(tiny_llama):
    counts = count_parameters(tiny_llama)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    assert counts.prunable == 4 * per_layer
    assert counts.total == sum(p.numel() for p in tiny_llama.parameters())
    assert counts.structural_sparsity == 0.0
    with torch.no_grad():
        adapter_for(tiny_llama).layers()[0].mlp.down_proj.weight.zero_()
    masked = count_parameters(tiny_llama)
    assert masked.prunable_zeros == 64 * 96
    assert masked.mask_sparsity == pytest.approx(64 * 96 / (4 * per_layer))
    assert count_parameters(tiny_llama, base_prunable=2 * counts.prunable).structural_sparsity == 0.5
