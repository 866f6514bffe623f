"""Export and reload: stock transformers in a fresh process must reproduce the pruned model."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import agent_prune
from agent_prune.actions import MANIFEST_FILE, apply_actions, dense_manifest
from agent_prune.errors import InputError
from agent_prune.models.export import MODELING_FILE, export_model, read_manifest
from agent_prune.models.formats import engines_that_load
from agent_prune.models.loading import load_model
from tests.compensation import calibration_ids, compensated_cut
from tests.conftest import FAMILIES, save_tiny, tiny_model, tiny_tokenizer

TOKENS = [[5, 17, 99, 3, 250, 64, 8, 1]]
UNIFORM = [{"kind": "prune_width", "layer": i, "heads": 1, "mlp_channels": 0.25} for i in range(4)]
MIXED = [{"kind": "prune_width", "layer": 1, "kv_groups": 1, "mlp_channels": 10},
         {"kind": "remove_layers", "layers": [2]}, {"kind": "mask_sparsity", "layer": 0, "ratio": 0.5}]

# Runs in a fresh interpreter with only stock transformers: no agent_prune import.
STOCK_RELOAD = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
tokens = torch.tensor(json.loads(sys.argv[1]))
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    generated = model.generate(tokens, max_new_tokens=4, do_sample=False)
    save_file({"logits": logits.contiguous(), "generated": generated}, folder + "/stock.safetensors")
    print(folder, type(model).__name__)
"""


def stock_reload(folders):
    result = subprocess.run([sys.executable, "-c", STOCK_RELOAD, json.dumps(TOKENS), *map(str, folders)],
                            capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(f"{folder}/stock.safetensors") for folder in folders]


def pruned(family, actions):
    model = tiny_model(family)
    return model, apply_actions(model, actions, dense_manifest(model))


def assert_stock_transformers_reproduces(models: list, folders: list) -> None:
    """Each folder, loaded by stock transformers in a fresh process, gives its model's logits and
    greedy tokens."""
    for model, folder, stock in zip(models, folders, stock_reload(folders)):
        with torch.no_grad():
            expected = model(torch.tensor(TOKENS)).logits
        torch.testing.assert_close(stock["logits"], expected, rtol=1e-6, atol=1e-6)
        expected_tokens = model.generate(torch.tensor(TOKENS), max_new_tokens=4, do_sample=False)
        assert torch.equal(stock["generated"], expected_tokens), folder


def test_exports_reload_in_stock_transformers(tmp_path):
    """Every family with per-layer widths (remote code), plus one uniform export (plain config)."""
    cases = [(family, MIXED) for family in FAMILIES] + [("qwen2", UNIFORM)]
    models, folders = [], []
    for index, (family, actions) in enumerate(cases):
        model, manifest = pruned(family, actions)
        summary = export_model(model, None, tmp_path / f"{index}-{family}", manifest)
        assert summary.heterogeneous == (actions is MIXED)
        assert (tmp_path / f"{index}-{family}" / MODELING_FILE).is_file() == summary.heterogeneous
        models.append(model)
        folders.append(summary.path)
    assert_stock_transformers_reproduces(models, folders)


def test_compensated_exports_reload_with_the_same_logits(tmp_path):
    """Biases from bias compensation survive every export. A uniform Llama keeps a stock config (its
    bias flags on, zeros for the projections without a bias) that transformers loads without remote
    code; the other families, whose stock layers have no down_proj bias, and per-layer widths go
    through the modeling file."""
    from transformers import AutoModelForCausalLM

    cases = [(family, UNIFORM) for family in FAMILIES] + [("llama", MIXED), ("qwen3", MIXED)]
    models, folders = [], []
    for index, (family, actions) in enumerate(cases):
        model, manifest = compensated_cut(tiny_model(family), actions, calibration_ids())
        folder = tmp_path / f"{index}-{family}"
        summary = export_model(model, None, folder, manifest)
        stock = family == "llama" and actions is UNIFORM
        config = json.loads((folder / "config.json").read_text())
        assert (folder / MODELING_FILE).is_file() != stock and ("auto_map" in config) != stock
        assert summary.extra_biases == (family != "llama") == ("agent_prune_layer_biases" in config)
        if family == "llama":
            assert config["attention_bias"] and config["mlp_bias"]
        loads_in = engines_that_load("hf", summary.heterogeneous, summary.extra_biases)
        assert ("vLLM, TensorRT-LLM (a stock config)" in loads_in) == stock
        with torch.no_grad():
            expected = model(torch.tensor(TOKENS)).logits
            reloaded = [agent_prune.load_pretrained(folder)[0]]
            if stock:
                reloaded.append(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
            for other in reloaded:
                torch.testing.assert_close(other(torch.tensor(TOKENS)).logits, expected, rtol=1e-6, atol=1e-6)
        models.append(model)
        folders.append(summary.path)
    assert_stock_transformers_reproduces(models, folders)


def test_uniform_export_has_a_plain_config(tmp_path):
    model, manifest = pruned("llama", [*UNIFORM, {"kind": "remove_layers", "layers": [0]}])
    export_model(model, tiny_tokenizer(), tmp_path / "out", manifest)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["num_hidden_layers"], config["head_dim"]) == (2, 2, 72, 3, 16)
    assert "auto_map" not in config and "agent_prune_layer_widths" not in config
    assert read_manifest(tmp_path / "out") == manifest


def test_load_pretrained_and_load_model_read_both_kinds(tmp_path):
    for name, actions in (("uniform", UNIFORM), ("mixed", MIXED)):
        model, manifest = pruned("gemma2", actions)
        export_model(model, tiny_tokenizer(), tmp_path / name, manifest)
        reloaded, tokenizer = agent_prune.load_pretrained(tmp_path / name)
        assert tokenizer is not None and not reloaded.training
        loaded = load_model(str(tmp_path / name))
        assert loaded.source.kind == "export"
        expected = model.state_dict()
        for other in (reloaded.state_dict(), loaded.model.state_dict()):
            assert list(other) == list(expected)
            assert all(torch.equal(expected[k], other[k]) for k in expected)
        # a reloaded export can be pruned further from its own manifest
        more = apply_actions(reloaded, [{"kind": "remove_layers", "layers": [0]}],
                             read_manifest(tmp_path / name))
        assert [r.source for r in more.layers] == [r.source for r in manifest.layers[1:]]


def test_export_replaces_only_an_earlier_export(tmp_path):
    model, manifest = pruned("llama", UNIFORM)
    export_model(model, None, tmp_path / "out", manifest)
    (tmp_path / "out" / "stale.txt").write_text("old")
    export_model(model, None, tmp_path / "out", manifest)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an agent-prune export"):
        export_model(model, None, tmp_path / "other", manifest)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_load_pretrained_needs_a_manifest(tmp_path):
    save_tiny(tmp_path / "plain")
    with pytest.raises(InputError, match=MANIFEST_FILE):
        agent_prune.load_pretrained(tmp_path / "plain")
