"""Physically removing a structure == zeroing (or bypassing) it in the original model."""

import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.models.adapters import adapter_for
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def prune(family, actions, **kwargs):
    model = tiny_model(family)
    manifest = apply_actions(model, actions, dense_manifest(model), **kwargs)
    return model, manifest


def gone(manifest, layer, attr):
    """Original indices of ``attr`` (kv_heads/heads/mlp_channels) removed from original layer ``layer``."""
    base = dense_manifest(tiny_model("llama")).layers[layer]
    kept = next(r for r in manifest.layers if r.source == layer)
    return sorted(set(getattr(base, attr)) - set(getattr(kept, attr)))


def zero_o_proj_heads(model, layer, heads):
    adapter = adapter_for(model)
    o_proj = adapter.attention_projections(adapter.layers()[layer])["o_proj"]
    with torch.no_grad():
        for head in heads:
            o_proj.weight[:, head * adapter.head_dim:(head + 1) * adapter.head_dim] = 0


def test_mlp_channels_equal_zeroed_channels(family):
    pruned, manifest = prune(family, [{"kind": "prune_width", "layer": 1, "mlp_channels": 0.25}])
    channels = gone(manifest, 1, "mlp_channels")
    assert len(channels) == 24
    reference = tiny_model(family)
    adapter = adapter_for(reference)
    with torch.no_grad():
        adapter.mlp_projections(adapter.layers()[1])["down_proj"].weight[:, channels] = 0
    assert adapter_for(pruned).layer_widths(adapter_for(pruned).layers()[1]).intermediate_size == 72
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=1e-5, atol=1e-5)


def test_kv_group_equals_zeroed_heads_of_group(family):
    pruned, manifest = prune(family, [{"kind": "prune_width", "layer": 2, "kv_groups": 1}])
    (group,) = gone(manifest, 2, "kv_heads")
    assert gone(manifest, 2, "heads") == [2 * group, 2 * group + 1]
    reference = tiny_model(family)
    zero_o_proj_heads(reference, 2, [2 * group, 2 * group + 1])
    widths = adapter_for(pruned).layer_widths(adapter_for(pruned).layers()[2])
    assert (widths.num_heads, widths.num_kv_heads) == (2, 1)
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=1e-5, atol=1e-5)


def test_query_heads_within_groups_equal_zeroed_heads(family):
    pruned, manifest = prune(family, [{"kind": "prune_width", "layer": 0, "heads": 1}])
    heads = gone(manifest, 0, "heads")
    assert sorted(h // 2 for h in heads) == [0, 1]  # one head from each KV group
    reference = tiny_model(family)
    zero_o_proj_heads(reference, 0, heads)
    widths = adapter_for(pruned).layer_widths(adapter_for(pruned).layers()[0])
    assert (widths.num_heads, widths.num_kv_heads) == (2, 2)
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=1e-5, atol=1e-5)


def test_removed_layers_equal_bypassed_layers(family):
    pruned, manifest = prune(family, [{"kind": "remove_layers", "layers": [1, 2]}])
    assert [r.source for r in manifest.layers] == [0, 3]
    reference = tiny_model(family)
    layers = adapter_for(reference).layers()
    for index in (1, 2):  # identity residual: the layer returns its input hidden states
        layers[index].register_forward_hook(
            lambda module, args, kwargs, out: kwargs.get("hidden_states", args[0] if args else None),
            with_kwargs=True)
    assert pruned.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=1e-5, atol=1e-5)


def test_generate_with_kv_cache_after_a_sequence_of_actions(family):
    pruned, manifest = prune(family, [
        {"kind": "prune_width", "layer": 1, "kv_groups": 1, "mlp_channels": 10},
        {"kind": "remove_layers", "layers": [2]},
        {"kind": "prune_width", "layer": 0, "heads": 0.5},
        {"kind": "mask_sparsity", "layer": 2, "ratio": 0.3},
        {"kind": "prune_width", "layer": 2, "mlp_channels": 0.5, "heads": 1},
    ])
    assert [w.model_dump() for w in manifest.widths()] == [
        {"num_heads": 2, "num_kv_heads": 2, "intermediate_size": 96},
        {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 86},
        {"num_heads": 2, "num_kv_heads": 2, "intermediate_size": 48},
    ]
    prompt = TOKENS[:1, :5]
    cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)


def test_given_scores_choose_lowest_and_skip_protected(family):
    scores = {1: {"mlp_channels": [float(c % 7) for c in range(96)], "kv_groups": [5.0, 1.0]}}
    protected = [{"layer": 1, "kind": "mlp_channel", "index": 0}]
    _, manifest = prune(family, [{"kind": "prune_width", "layer": 1, "mlp_channels": 3, "kv_groups": 1}],
                        scores=scores, protected=protected)
    assert gone(manifest, 1, "mlp_channels") == [7, 14, 21]  # score 0, channel 0 protected
    assert gone(manifest, 1, "kv_heads") == [1]
    assert manifest.actions[0].score_sources == {"kv_groups": "profile", "mlp_channels": "profile"}


@pytest.mark.parametrize("family", ["llama"])
def test_scores_follow_layers_through_renumbering(family):
    # Scores are given for CURRENT layer 3; after removing layer 0 it is layer 2.
    scores = {3: {"mlp_channels": [0.0 if c in (5, 6) else 1.0 for c in range(96)]}}
    _, manifest = prune(family, [{"kind": "remove_layers", "layers": [0]},
                                 {"kind": "prune_width", "layer": 2, "mlp_channels": 2}], scores=scores)
    assert gone(manifest, 3, "mlp_channels") == [5, 6]
    assert manifest.actions[1].layer_sources == [3]


def test_weight_magnitude_fallback_is_recorded():
    _, manifest = prune("llama", [{"kind": "prune_width", "layer": 0, "mlp_channels": 4}])
    assert manifest.actions[0].score_sources == {"mlp_channels": "weight_magnitude"}



def test_config_states_the_widest_layer():
    uniform = [{"kind": "prune_width", "layer": i, "heads": 1, "mlp_channels": 6} for i in range(4)]
    model, manifest = prune("qwen3", uniform)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 2, 90)
    apply_actions(model, [{"kind": "prune_width", "layer": 0, "kv_groups": 1}], manifest)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 16)
