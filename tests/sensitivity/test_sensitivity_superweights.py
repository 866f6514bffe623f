import torch

from agent_prune.models.adapters import adapter_for
from agent_prune.sensitivity import profile_model
from tests.conftest import tiny_model

LAYER, ROW, COLUMN = 1, 5, 7


def plant_super_weight(model) -> None:
    """A massive MLP input channel (COLUMN) meeting one large down_proj weight, as in real LLMs."""
    mlp = adapter_for(model).mlp_projections(adapter_for(model).layers()[LAYER])
    with torch.no_grad():
        mlp["gate_proj"].weight[COLUMN] *= 30
        mlp["up_proj"].weight[COLUMN] *= 30
        mlp["down_proj"].weight[ROW, COLUMN] = 5.0


def windows() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))


def test_a_planted_super_weight_is_found_and_protected():
    model = tiny_model("llama")
    assert profile_model(model, windows(), gradients=False).super_weights == []  # control
    plant_super_weight(model)
    profile = profile_model(model, windows(), gradients=False)
    assert [(sw.layer, sw.row, sw.column) for sw in profile.super_weights] == [(LAYER, ROW, COLUMN)]
    assert profile.super_weights[0].weight == 5.0
    assert abs(profile.super_weights[0].residual_out) > abs(profile.super_weights[0].residual_in)
    kinds = {(p.layer, p.kind, p.index) for p in profile.protected}
    assert kinds == {(LAYER, "mlp_channel", COLUMN), (LAYER, "layer", LAYER)}
    assert profile.is_protected(LAYER, "layer")
    assert profile.is_protected(LAYER, "mlp_channel", COLUMN)
    assert not profile.is_protected(LAYER, "mlp_channel", COLUMN + 1)
    assert not profile.is_protected(LAYER + 1, "layer")
    # the planted channel also dominates the structural scores pruners choose from
    channels = profile.layers[LAYER].structures.mlp_channels
    assert max(range(len(channels)), key=channels.__getitem__) == COLUMN


def test_protected_items_use_current_indices_and_map_to_sources():
    model = tiny_model("llama")
    plant_super_weight(model)
    adapter_for(model).keep_layers([0, 1, 3])  # drop dense layer 2: the planted layer keeps index 1
    model_sources = [0, 1, 3]
    adapter_for(model).keep_layers([1, 2])     # now drop dense layer 0: the planted layer is index 0
    profile = profile_model(model, windows(), gradients=False, layer_sources=model_sources[1:])
    current = {(p.layer, p.kind, p.index) for p in profile.protected}
    assert current == {(0, "mlp_channel", COLUMN), (0, "layer", 0)}
    mapped = {(p.layer, p.kind, p.index) for p in profile.protected_sources()}
    assert mapped == {(LAYER, "mlp_channel", COLUMN), (LAYER, "layer", LAYER)}
