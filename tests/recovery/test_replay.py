"""Recovered states are replayable: manifest + side tensors rebuild them bit for bit, and exports load."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from agent_prune.actions import PruneWidth, RemoveLayers, apply_actions, dense_manifest, replay, side_tensors
from agent_prune.actions.manifest import parse_manifest
from agent_prune.actions.surgery import restructured_copy
from agent_prune.checkpoints.store import read_state_dir, write_state_dir
from agent_prune.models.export import export_model, load_pretrained
from agent_prune.recovery import HealSettings, heal, reconstruct
from tests.compensation import calibration_ids, compensated_cut
from tests.conftest import FAMILIES, tiny_model
from tests.recovery.conftest import byte_tokenizer


def windows(count: int, seqlen: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def pruned_state(family: str = "llama"):
    """A base model and a copy cut in width (heads and channels, unevenly) and depth."""
    base = tiny_model(family, initializer_range=0.1)
    model = tiny_model(family, initializer_range=0.1)
    actions = [PruneWidth(layer=0, heads=1, mlp_channels=40), PruneWidth(layer=2, mlp_channels=16),
               RemoveLayers(layers=[1])]
    manifest = apply_actions(model, actions, dense_manifest(model))
    return base, model, manifest


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_reconstructed_checkpoint_replays_bit_for_bit(family, tmp_path):
    base, model, manifest = pruned_state(family)
    report = reconstruct(model, base, manifest, windows(24))
    assert report.overrides and set(report.overrides) <= set(manifest.overridden)
    write_state_dir(tmp_path / "state", manifest.model_dump(mode="json"), side_tensors(model, manifest), {})
    stored_manifest, tensors, _ = read_state_dir(tmp_path / "state")
    rebuilt = replay(base, parse_manifest(json.dumps(stored_manifest)), tensors)
    assert_same_weights(rebuilt, model)


def test_healed_checkpoint_replays_bit_for_bit_and_exports_load(tmp_path):
    base, model, manifest = pruned_state()
    reconstruct(model, base, manifest, windows(16))
    report = heal(model, base, windows(8), HealSettings(max_tokens=8 * 32, method="lora", lr=1e-3),
                  manifest=manifest)
    assert set(report.overrides) <= set(manifest.overridden)
    assert "L0.self_attn.q_proj" in manifest.overridden  # LoRA merged into every projection
    assert_same_weights(replay(base, manifest, side_tensors(model, manifest)), model)

    export_model(model, byte_tokenizer(), tmp_path / "export", manifest)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    ours, _ = load_pretrained(tmp_path / "export")
    ids = windows(2, seed=11)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(stock(ids).logits, expected)
        assert torch.equal(ours(ids).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_compensated_biases_replay_bit_for_bit_where_the_base_has_none(family, tmp_path):
    """Bias compensation gives o_proj/down_proj biases the base model lacks; replay recreates them,
    and the refit that follows keeps them."""
    base = tiny_model(family, initializer_range=0.1)
    model, manifest = compensated_cut(base, [PruneWidth(layer=0, heads=1, mlp_channels=40),
                                             RemoveLayers(layers=[1]), PruneWidth(layer=1, mlp_channels=16)],
                                      calibration_ids())
    compensated = {key: value.clone() for key, value in model.state_dict().items() if key.endswith(".bias")}
    reconstruct(model, base, manifest, windows(16))
    dense_layer = base.model.layers[0]
    assert dense_layer.mlp.down_proj.bias is None and dense_layer.self_attn.o_proj.bias is None
    assert {key for key in compensated if "o_proj" in key or "down_proj" in key} == {
        "model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.down_proj.bias",
        "model.layers.1.mlp.down_proj.bias"}
    assert all(torch.equal(model.state_dict()[key], value) for key, value in compensated.items())
    write_state_dir(tmp_path / "state", manifest.model_dump(mode="json"), side_tensors(model, manifest), {})
    stored_manifest, tensors, _ = read_state_dir(tmp_path / "state")
    assert_same_weights(replay(base, parse_manifest(json.dumps(stored_manifest)), tensors), model)


def test_a_copy_cut_further_keeps_the_biases_as_a_cut_in_place_does():
    base = tiny_model("llama", initializer_range=0.1)
    model, manifest = compensated_cut(base, [PruneWidth(layer=2, heads=1, mlp_channels=40)],
                                      calibration_ids())
    in_place = copy.deepcopy(model)
    further = apply_actions(in_place, [PruneWidth(layer=2, mlp_channels=8), RemoveLayers(layers=[0])],
                            manifest)
    copied = restructured_copy(model, manifest.layers, further.layers)
    assert copied.model.layers[1].mlp.down_proj.bias is not None
    assert torch.equal(copied.model.layers[1].mlp.down_proj.bias, model.model.layers[2].mlp.down_proj.bias)
    assert_same_weights(copied, in_place)
