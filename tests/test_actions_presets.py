import pytest

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.actions.presets import tail_depth_actions, uniform_width_actions
from agent_prune.models.accounting import count_parameters
from tests.conftest import tiny_model


def test_tail_depth_keeps_the_last_layer():
    model = tiny_model("llama", num_hidden_layers=6)
    manifest = apply_actions(model, tail_depth_actions(dense_manifest(model), 2), dense_manifest(model))
    assert [r.source for r in manifest.layers] == [0, 1, 2, 5]


@pytest.mark.parametrize(("heads", "fraction"), [(4, 0.2), (8, 0.3)])
def test_uniform_width_hits_the_fraction(heads, fraction):
    model = tiny_model("qwen2", num_attention_heads=heads)
    base = dense_manifest(model)
    manifest = apply_actions(model, uniform_width_actions(base, fraction), base)
    assert len(set(manifest.widths())) == 1  # uniform: a plain config loads it
    sparsity = count_parameters(model, base.base.prunable_parameters).structural_sparsity
    assert sparsity == pytest.approx(fraction, abs=0.01)
