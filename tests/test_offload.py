"""Offloaded decoder layers (``--device-map auto``): a model whose layers live on disk or in host
memory gives the same logits, profile, candidates, replays and export as the same model held whole,
bit for bit, while only the running layer holds real weights."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest, replay, side_tensors
from agent_prune.models.adapters import adapter_for
from agent_prune.models.export import export_model
from agent_prune.models.loading import OffloadRequest, load_model
from agent_prune.models.offload import (
    is_offloaded,
    materialized,
    offload_layers,
    shared_memo,
    slot_of,
    state_items,
)
from agent_prune.models.offload_homes import LayerStore
from agent_prune.models.precision import compute_dtype, evaluated_in
from agent_prune.recovery import reconstruct
from agent_prune.recovery.bias import compensate_biases
from agent_prune.sensitivity import profile_model
from tests.compensation import calibration_ids
from tests.conftest import save_tiny, tiny_tokenizer

CAP = {"cpu": "300KiB"}  # below a 6-layer tiny model, above its embeddings, lm_head and one layer


def loaded_pair(tmp_path: Path, family: str, **overrides):
    """The same tiny model loaded whole and with its layers offloaded to disk."""
    folder = save_tiny(tmp_path / "model", family, num_hidden_layers=6, **overrides)
    held = load_model(str(folder))
    offloaded = load_model(str(folder), offload=OffloadRequest(CAP, tmp_path / "spill"))
    assert held.offload is None and offloaded.offload == "disk" and is_offloaded(offloaded.model)
    return held.model, offloaded.model


def real_layers(model) -> list[int]:
    return [i for i, layer in enumerate(adapter_for(model).layers())
            if any(p.device.type != "meta" for p in layer.parameters())]


def full_state(model) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    prefixes = {adapter.layer_key_prefix(i): layer for i, layer in enumerate(adapter.layers())}
    return {name: tensor.clone() for name, tensor in state_items(model, prefixes)}


def assert_same_state(a, b) -> None:
    sa, sb = full_state(a), full_state(b)
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_offloaded_forward_holds_one_layer_and_gives_the_same_bits(tmp_path, family):
    held, offloaded = loaded_pair(tmp_path, family)
    assert real_layers(offloaded) == []
    seen = []
    for index, layer in enumerate(adapter_for(offloaded).layers()):  # after the loading hook
        layer.register_forward_pre_hook(lambda _m, _a, i=index: seen.append((i, real_layers(offloaded))))
    ids = calibration_ids(2, 24)
    with torch.inference_mode():
        assert torch.equal(held(ids).logits, offloaded(ids).logits)
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(held.generate(ids, **greedy), offloaded.generate(ids, **greedy))  # KV cache
    assert seen and all(layers == [i] for i, layers in seen), seen[:6]
    assert real_layers(offloaded) == []


def test_a_copy_shares_homes_until_a_layer_changes_and_unused_files_go(tmp_path):
    _, model = loaded_pair(tmp_path, "llama")
    spill = tmp_path / "spill"
    copied = copy.deepcopy(model)
    layer, original = adapter_for(copied).layers()[2], adapter_for(model).layers()[2]
    assert slot_of(layer).home is slot_of(original).home
    with materialized(original) as before:
        kept = before.mlp.down_proj.weight.clone()
    with torch.no_grad(), materialized(layer, write=True):
        layer.mlp.down_proj.weight.mul_(2)
    assert slot_of(layer).home is not slot_of(original).home
    assert list(spill.glob("*.safetensors")) == [slot_of(layer).home.path]
    with materialized(layer) as changed, materialized(original) as unchanged:
        assert torch.equal(changed.mlp.down_proj.weight, 2 * kept)
        assert torch.equal(unchanged.mlp.down_proj.weight, kept)
    del copied, layer, changed
    gc.collect()
    assert list(spill.glob("*.safetensors")) == []


def test_host_memory_homes_run_the_same(tmp_path):
    held, _ = loaded_pair(tmp_path, "qwen3")
    in_ram = copy.deepcopy(held)
    offload_layers(in_ram, LayerStore(None), torch.device("cpu"))
    assert real_layers(in_ram) == []
    ids = calibration_ids(2, 24)
    with torch.no_grad():
        assert torch.equal(held(ids).logits, in_ram(ids).logits)
    assert_same_state(held, in_ram)


def candidate(model, ids, profile):
    """A width cut of two layers with bias compensation and reconstruction, as the loop builds it."""
    manifest = dense_manifest(model)
    built = copy.deepcopy(model, shared_memo(model))
    actions = [{"kind": "prune_width", "layer": 1, "mlp_channels": 0.25, "heads": 1},
               {"kind": "prune_width", "layer": 4, "mlp_channels": 0.5}]
    scores = dict(enumerate(profile.structure_scores("fluctuation")))
    new = apply_actions(built, actions, manifest, scores=scores)
    compensate_biases(model, built, manifest, new, [layer.input_means for layer in profile.layers])
    reconstruct(built, model, new, ids, first_changed=1)
    return built, new


def test_profile_candidate_replay_and_export_match_the_held_model(tmp_path, family):
    held, offloaded = loaded_pair(tmp_path, family)
    ids = calibration_ids(4, 32)
    profiles = [profile_model(m, ids, gradients=family == "llama", hessians=True) for m in (held, offloaded)]
    dumps = [p.model_dump(exclude={"cost"}) for p in profiles]
    assert dumps[0] == dumps[1]
    a, manifest_a = candidate(held, ids, profiles[0])
    b, manifest_b = candidate(offloaded, ids, profiles[1])
    assert manifest_a == manifest_b and manifest_a.overridden
    assert real_layers(b) == [] and is_offloaded(b)
    assert_same_state(a, b)
    tensors_a, tensors_b = side_tensors(a, manifest_a), side_tensors(b, manifest_b)
    assert list(tensors_a) == list(tensors_b)
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    replayed = replay(offloaded, manifest_b, tensors_b)
    assert_same_state(a, replayed)
    for name, model in (("held", a), ("offloaded", replayed)):
        export_model(model, tiny_tokenizer(), tmp_path / name, manifest_a)
    files = sorted(p.name for p in (tmp_path / "held").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "offloaded").iterdir())
    for name in files:
        assert (tmp_path / "held" / name).read_bytes() == (tmp_path / "offloaded" / name).read_bytes(), name


def test_a_depth_cut_writes_no_layer_and_a_model_that_fits_is_not_offloaded(tmp_path):
    _, offloaded = loaded_pair(tmp_path, "llama")
    manifest = dense_manifest(offloaded)
    cut = copy.deepcopy(offloaded)
    apply_actions(cut, [{"kind": "remove_layers", "layers": [2, 3]}], manifest)
    assert len(adapter_for(cut).layers()) == 4 and not list((tmp_path / "spill").glob("*.safetensors"))
    roomy = load_model(str(tmp_path / "model"), offload=OffloadRequest({"cpu": "1GiB"}, tmp_path / "more"))
    assert roomy.offload is None and not is_offloaded(roomy.model)


def test_streamed_safetensors_equal_save_file(tmp_path):
    from safetensors.torch import save_file

    from agent_prune.models.streamed_safetensors import write_streamed

    g = torch.Generator().manual_seed(0)
    tensors = {"model.layers.10.w": torch.randn(3, 5, generator=g),
               "model.layers.2.w": torch.randn(4, generator=g),
               "b": torch.randn(2, 2, generator=g).bfloat16(), "c": torch.arange(5), "e": torch.zeros(0),
               "h": torch.randn(7, generator=g).half(), "m": torch.rand(4, generator=g) > 0.5}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    entries = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    write_streamed(tmp_path / "mine.safetensors", entries, {"format": "pt"}, reversed(tensors.items()))
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "mine.safetensors").read_bytes()
    with pytest.raises(ValueError, match="never written"):
        write_streamed(tmp_path / "part.safetensors", entries, None, list(tensors.items())[:2])


def test_a_bfloat16_scoring_leaves_an_offloaded_copy_and_its_base_as_they_are(tmp_path):
    """An offloaded copy shares the base model's embeddings and head: scoring it in bfloat16 must
    not cast them in place (it is scored as stored)."""
    _, model = loaded_pair(tmp_path, "llama")
    replay = copy.deepcopy(model, shared_memo(model))
    assert replay.model.embed_tokens.weight is model.model.embed_tokens.weight
    with compute_dtype("bfloat16"), evaluated_in(replay, owned=True) as scored:
        assert scored is replay
    assert {p.dtype for p in model.parameters()} == {torch.float32}
