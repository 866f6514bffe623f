import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from agent_prune.cli import main
from tests.conftest import SHARED_DATA, tiny_model
from tests.recovery.conftest import byte_tokenizer
from tests.recovery.surgery import cut_mlp


@pytest.fixture
def teacher_and_student(tmp_path):
    if not (SHARED_DATA / "c4").is_dir():
        pytest.skip("shared data not found")
    teacher = tiny_model("llama", initializer_range=0.1)
    # A student from "another tool": a plain HF folder, here a narrower MLP in every layer.
    student = cut_mlp(teacher, 64)
    student.config.intermediate_size = 64
    for model, name in ((teacher, "teacher"), (student, "student")):
        model.save_pretrained(tmp_path / name)
        byte_tokenizer().save_pretrained(tmp_path / name)
    return tmp_path / "teacher", tmp_path / "student"


def test_heal_command_saves_a_model_stock_transformers_loads(teacher_and_student, tmp_path, capsys):
    teacher, student = teacher_and_student
    out = tmp_path / "healed"
    code = main(["heal", "--model", str(student), "--teacher", str(teacher), "--out", str(out),
                 "--tokens", "2048", "--seqlen", "64", "--ppl-windows", "2", "--batch-size", "2",
                 "--lr", "1e-3", "--data-dir", str(SHARED_DATA), "--json", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 2048 and result["before"]["kl"] > 0
    assert result["after"]["kl"] < result["before"]["kl"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[0].mlp.down_proj.in_features == 64
    report = json.loads((out / "heal_report.json").read_text())
    assert report["tokens"] == 2048
    ids = torch.randint(0, 256, (1, 16))
    original = AutoModelForCausalLM.from_pretrained(student)
    assert not torch.equal(reloaded(ids).logits, original(ids).logits)


def test_heal_command_refuses_an_existing_output(teacher_and_student, tmp_path, capsys):
    teacher, student = teacher_and_student
    code = main(["heal", "--model", str(student), "--teacher", str(teacher), "--out", str(tmp_path),
                 "--tokens", "100"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_heal_command_keeps_an_agent_prune_export_an_export(tmp_path, capsys):
    from agent_prune.actions import PruneWidth, apply_actions, dense_manifest
    from agent_prune.models.export import export_model, read_manifest

    if not (SHARED_DATA / "c4").is_dir():
        pytest.skip("shared data not found")
    teacher = tiny_model("llama", initializer_range=0.1)
    teacher.save_pretrained(tmp_path / "teacher")
    byte_tokenizer().save_pretrained(tmp_path / "teacher")
    student = tiny_model("llama", initializer_range=0.1)
    manifest = apply_actions(student, [PruneWidth(layer=1, mlp_channels=32)], dense_manifest(student))
    export_model(student, byte_tokenizer(), tmp_path / "student", manifest)
    out = tmp_path / "healed"
    code = main(["heal", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                 "--out", str(out), "--tokens", "512", "--seqlen", "64", "--ppl-windows", "0",
                 "--modules", "down_proj", "--data-dir", str(SHARED_DATA), "--json", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["after"]["perplexity"] is None
    assert "L1.mlp.down_proj" in read_manifest(out).overridden
    healed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert healed.model.layers[1].mlp.down_proj.in_features == 64
