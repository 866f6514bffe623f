"""Invalid actions are rejected with one clear line, and the model is never half-pruned."""

import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.errors import InputError, InvalidActionError
from tests.conftest import tiny_model

GOOD = {"kind": "prune_width", "layer": 0, "mlp_channels": 0.5}


@pytest.mark.parametrize(("bad", "fragment"), [
    ({"kind": "remove_layers", "layers": [4]}, "layer 4 does not exist"),
    ({"kind": "remove_layers", "layers": [0, 1, 2, 3]}, "all 4 layers"),
    ({"kind": "prune_width", "layer": -1, "heads": 1}, "does not exist"),
    ({"kind": "prune_width", "layer": 1, "kv_groups": 2}, "would leave none"),
    ({"kind": "prune_width", "layer": 1, "heads": 2}, "would leave none"),
    ({"kind": "prune_width", "layer": 1, "mlp_channels": 96}, "would leave none"),
    ({"kind": "prune_width", "layer": 1, "mlp_channels": 0.001}, "removes nothing"),
    ({"kind": "prune_width", "layer": 0, "mlp_channels": 48}, "would leave none"),  # after GOOD: 48 left
    ({"kind": "prune_width", "layer": 0, "mlp_channels": 44}, None),  # valid: 4 channels left...
    ({"kind": "mask_sparsity", "layer": 9, "ratio": 0.5}, "does not exist"),
])
def test_invalid_action_leaves_model_untouched(bad, fragment):
    model = tiny_model("llama")
    manifest = dense_manifest(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    actions = [GOOD, bad]
    if fragment is None:  # ...so a 4:8 mask cannot tile down_proj's 4 input features
        actions.append({"kind": "mask_sparsity", "layer": 0, "pattern": "4:8"})
        fragment = "4 input features, not a multiple of 8"
    with pytest.raises(InvalidActionError) as info:
        apply_actions(model, actions, manifest)
    assert fragment in info.value.message and info.value.hint
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert manifest == dense_manifest(model)


def test_protected_structures_need_force():
    model = tiny_model("llama")
    manifest = dense_manifest(model)
    protected = [{"layer": 2, "kind": "mlp_channel", "index": 5}, {"layer": 1, "kind": "head", "index": 0},
                 {"layer": 3, "kind": "layer"}, {"layer": 0, "kind": "kv_group", "index": 1}]
    for action, fragment in [
        ({"kind": "remove_layers", "layers": [2]}, "protected"),
        ({"kind": "remove_layers", "layers": [3]}, "protected"),
        ({"kind": "prune_width", "layer": 0, "kv_groups": 1, "heads": 1}, "lose 1 heads: only 0 of 2"),
        ({"kind": "mask_sparsity", "layer": 2, "pattern": "2:4"}, "protected"),
    ]:
        with pytest.raises(InvalidActionError, match=fragment):
            apply_actions(model, [action], manifest, protected=protected)
    # group 0 holds protected head 0: the other group goes, and head 0 survives the per-group cut
    done = apply_actions(model, [{"kind": "prune_width", "layer": 1, "kv_groups": 1, "heads": 1}], manifest,
                         protected=protected)
    assert done.layers[1].kv_heads == [0] and done.layers[1].heads == [0]
    forced = apply_actions(model, [{"kind": "remove_layers", "layers": [2], "force": True}], done,
                           protected=protected)
    assert [r.source for r in forced.layers] == [0, 1, 3]


def test_protected_items_and_scores_must_exist():
    model = tiny_model("llama")
    manifest = dense_manifest(model)
    with pytest.raises(InvalidActionError, match="no valid index"):
        apply_actions(model, [GOOD], manifest, protected=[{"layer": 0, "kind": "head", "index": 4}])
    with pytest.raises(InvalidActionError, match="names no existing"):
        apply_actions(model, [GOOD], manifest, protected=[{"layer": 0, "kind": "neuron", "index": 1}])
    with pytest.raises(InvalidActionError, match="have 3 entries"):
        apply_actions(model, [GOOD], manifest, scores={0: {"mlp_channels": [1.0, 2.0, 3.0]}})


def test_manifest_must_match_the_model():
    model = tiny_model("llama")
    stale = dense_manifest(model)
    apply_actions(model, [{"kind": "remove_layers", "layers": [0]}], stale)
    with pytest.raises(InputError, match="manifest"):
        apply_actions(model, [GOOD], stale)
