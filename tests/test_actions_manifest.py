import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest, parse_manifest, replay, side_tensors
from agent_prune.actions.manifest import format_ranges, parse_ranges
from agent_prune.errors import InputError
from agent_prune.models.adapters import adapter_for
from tests.conftest import tiny_model

SEQUENCE = [
    {"kind": "mask_sparsity", "layer": 3, "ratio": 0.4},
    {"kind": "prune_width", "layer": 1, "kv_groups": 1, "mlp_channels": 0.25},
    {"kind": "remove_layers", "layers": [0]},
    {"kind": "prune_width", "layer": 2, "heads": 1, "mlp_channels": 8},  # original layer 3, masked
    {"kind": "mask_sparsity", "layer": 1, "pattern": "2:4"},
]


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def pruned_with_refit(family="qwen2"):
    """A pruned model whose down_proj in current layer 0 (original 1) was overwritten, as a refit does."""
    model = tiny_model(family)
    manifest = apply_actions(model, SEQUENCE, dense_manifest(model, fingerprint="abc"))
    adapter = adapter_for(model)
    with torch.no_grad():
        adapter.mlp_projections(adapter.layers()[0])["down_proj"].weight.mul_(1.37)
        adapter.attention_projections(adapter.layers()[1])["q_proj"].bias.add_(0.5)
        adapter.final_norm().weight.add_(0.1)
    manifest.mark_overridden(0, "mlp.down_proj")
    manifest.mark_overridden(1, "self_attn.q_proj")
    manifest.mark_overridden(None, "model.norm")
    return model, manifest


def test_replay_reproduces_pruned_model_bit_for_bit(family):
    model = tiny_model(family)
    manifest = apply_actions(model, SEQUENCE, dense_manifest(model))
    base = tiny_model(family)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    rebuilt = replay(base, manifest, side_tensors(model, manifest))
    assert_same_state(rebuilt, model)
    assert rebuilt.config.num_hidden_layers == 3
    assert_same_state(base, tiny_model(family))  # base untouched
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_replay_builds_an_independent_model_that_runs_like_the_pruned_one(family):
    """Replay copies layer by layer (never a second whole model); the parts must still form one model."""
    model = tiny_model(family)
    manifest = apply_actions(model, SEQUENCE, dense_manifest(model))
    base = tiny_model(family)
    rebuilt = replay(base, manifest, side_tensors(model, manifest))
    base_storage = {p.data_ptr() for p in base.parameters()}
    assert not any(p.data_ptr() in base_storage for p in rebuilt.parameters())
    layers = adapter_for(rebuilt).layers()
    assert len(adapter_for(base).layers()) == base.config.num_hidden_layers == 4
    assert all(adapter_for(rebuilt).attention(layer).config is rebuilt.config for layer in layers)
    assert [adapter_for(rebuilt).attention(layer).layer_idx for layer in layers] == [0, 1, 2]
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_replay_restores_overridden_weights_and_biases():
    model, manifest = pruned_with_refit()
    tensors = side_tensors(model, manifest)
    assert {"L1.mlp.down_proj.weight", "L2.self_attn.q_proj.weight", "L2.self_attn.q_proj.bias",
            "model.norm.weight"} <= set(tensors)
    assert "L1.mlp.down_proj.weight.mask" not in tensors  # the override already holds the zeros
    assert tensors["L3.mlp.down_proj.weight.mask"].dtype == torch.bool
    assert_same_state(replay(tiny_model("qwen2"), manifest, tensors), model)


def test_side_tensor_keys_use_original_layer_indices():
    model, manifest = pruned_with_refit()
    keys = set(side_tensors(model, manifest))
    # current layer 0 is original 1: keys must not shift when earlier layers go
    assert all(k.startswith(("L1.", "L2.", "L3.", "model.")) for k in keys)
    more = apply_actions(model, [{"kind": "remove_layers", "layers": [0]}], manifest)
    assert not any(k.startswith("L1.") for k in side_tensors(model, more))
    assert set(side_tensors(model, more)) <= keys


def test_manifest_json_round_trip_is_compact():
    _, manifest = pruned_with_refit()
    text = manifest.to_json()
    assert '"mlp_channels": "' in text  # range strings, not long lists
    again = parse_manifest(text)
    assert again == manifest
    assert [a.action for a in again.actions] == [a.action for a in manifest.actions]
    assert again.base.fingerprint == "abc" and again.is_structural


def test_ranges_round_trip():
    values = [0, 1, 2, 5, 7, 8, 20]
    assert format_ranges(values) == "0-2,5,7-8,20"
    assert parse_ranges("0-2,5,7-8,20") == values
    assert format_ranges([]) == "" and parse_ranges("") == []
    with pytest.raises(ValueError):
        parse_ranges([3, 1])


def test_replay_needs_the_side_tensors():
    _, manifest = pruned_with_refit()
    with pytest.raises(InputError, match="side tensors"):
        replay(tiny_model("qwen2"), manifest)


def test_replay_rejects_another_base_model():
    model, manifest = pruned_with_refit()
    with pytest.raises(InputError, match="base"):
        replay(tiny_model("qwen2", num_hidden_layers=3), manifest, side_tensors(model, manifest))


def test_mask_only_manifest_is_not_structural():
    model = tiny_model("llama")
    action = {"kind": "mask_sparsity", "layer": 0, "ratio": 0.5}
    manifest = apply_actions(model, [action], dense_manifest(model))
    assert not manifest.is_structural
    adapter = adapter_for(model)
    assert manifest.masked == [f"L0.{name}" for name in adapter.linear_modules(adapter.layers()[0])]
    assert "no size or speed change" in manifest.actions[0].effect


def test_invalid_manifest_records_are_rejected():
    text = dense_manifest(tiny_model("llama")).to_json()
    assert parse_manifest(text.replace('"heads": "0-3"', '"heads": "0,2"', 1))  # one head per group
    with pytest.raises(InputError, match="evenly"):  # two heads in group 0, one in group 1
        parse_manifest(text.replace('"heads": "0-3"', '"heads": "0-2"', 1))
    with pytest.raises(InputError, match="ascending"):
        parse_manifest(text.replace('"source": 1', '"source": 0', 1))
