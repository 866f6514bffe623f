"""The shared model: prune by depth and width, export, reload with stock transformers elsewhere."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.actions.presets import tail_depth_actions, uniform_width_actions
from agent_prune.models.accounting import count_parameters
from agent_prune.models.export import export_model

pytestmark = pytest.mark.integration

RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
print(json.dumps({"tokens": out[0].tolist(), "params": sum(p.numel() for p in model.parameters()),
                  "class": type(model).__name__}))
"""


def test_presets_remove_20_percent(shared_model):
    base = dense_manifest(shared_model.model)
    depth = tail_depth_actions(base, 6)
    assert depth[0].layers == [23, 24, 25, 26, 27, 28]
    width = uniform_width_actions(base, 0.2)
    assert {(a.heads, a.mlp_channels) for a in width} == {(1, 282)}
    per_layer = 576 * 64 * 2 * (9 + 3) + 3 * 576 * 1536
    assert 30 * (576 * 64 * 2 * 3 + 282 * 3 * 576) / (30 * per_layer) == pytest.approx(0.2, abs=1e-3)


def test_pruned_export_reloads_in_stock_transformers(shared_model, tmp_path):
    model = copy.deepcopy(shared_model.model)
    base = dense_manifest(model)
    actions = [{"kind": "remove_layers", "layers": [26, 27]},
               {"kind": "prune_width", "layer": 5, "kv_groups": 1, "mlp_channels": 0.25}]
    manifest = apply_actions(model, actions, base)
    counts = count_parameters(model, base.base.prunable_parameters)
    removed = 2 * 3_538_944 + 576 * 64 * 2 * (3 + 1) + 384 * 3 * 576
    assert counts.prunable == base.base.prunable_parameters - removed
    summary = export_model(model, shared_model.tokenizer, tmp_path / "export", manifest)
    assert summary.heterogeneous
    assert summary.safetensors_bytes == pytest.approx(4 * counts.total, rel=1e-3)  # fp32, tied once

    prompt = shared_model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    result = subprocess.run([sys.executable, "-c", RELOAD, summary.path, json.dumps(prompt.tolist())],
                            capture_output=True, text=True, timeout=600, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["class"] == "AgentPruneLlamaForCausalLM"
    assert reloaded["params"] == counts.total
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False)
    assert reloaded["tokens"] == expected[0].tolist()
    assert len(reloaded["tokens"]) > prompt.shape[1]
