import json

import torch

from agent_prune.cli import main
from agent_prune.models.export import load_pretrained
from tests.conftest import save_tiny


def run_json(capsys, *argv):
    code = main(["apply", *argv, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 else None)


def test_apply_prunes_and_exports(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "base", "qwen3")
    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([{"kind": "remove_layers", "layers": [1]},
                                   {"kind": "prune_width", "layer": 0, "mlp_channels": 0.25}]))
    code, result = run_json(capsys, "--model", str(model_dir), "--actions", str(actions),
                            "--out", str(tmp_path / "out"))
    assert code == 0
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96
    assert result["before"]["prunable"] == 4 * per_layer
    assert result["after"]["prunable"] == 3 * per_layer - 3 * 64 * 24
    assert result["after"]["weight_bytes"] < result["before"]["weight_bytes"]
    assert result["note"].startswith("structural")
    assert [a["action"]["kind"] for a in result["actions"]] == ["remove_layers", "prune_width"]
    model, _ = load_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3


def test_mask_only_result_says_no_size_or_speed_change(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "base")
    code, result = run_json(capsys, "--model", str(model_dir), "--out", str(tmp_path / "out"),
                            "--actions", '[{"kind": "mask_sparsity", "layer": 2, "pattern": "2:4"}]')
    assert code == 0
    assert result["note"] == "no size or speed change"
    assert result["after"]["total"] == result["before"]["total"]
    assert result["after"]["mask_sparsity"] > 0.1
    assert "no size or speed change" in result["actions"][0]["effect"]
    main(["apply", "--model", str(model_dir), "--out", str(tmp_path / "out2"),
          "--actions", '[{"kind": "mask_sparsity", "layer": 2, "ratio": 0.5}]'])
    assert "no size or speed change" in " ".join(capsys.readouterr().err.split())


def test_bad_actions_exit_2_with_one_line(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "base")
    capsys.readouterr()  # drop save_pretrained's progress output
    code = main(["apply", "--model", str(model_dir), "--out", str(tmp_path / "out"),
                 "--actions", '[{"kind": "prune_width", "layer": 7, "heads": 1}]'])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: prune_width: layer 7 does not exist") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert main(["apply", "--model", str(model_dir), "--out", str(tmp_path / "out"),
                 "--actions", str(tmp_path / "missing.json")]) == 2


def test_apply_continues_from_an_export(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "base")
    first = '[{"kind": "remove_layers", "layers": [0]}]'
    code, _ = run_json(capsys, "--model", str(model_dir), "--actions", first, "--out", str(tmp_path / "a"))
    assert code == 0
    code, result = run_json(capsys, "--model", str(tmp_path / "a"), "--actions", first,
                            "--out", str(tmp_path / "b"))
    assert code == 0 and result["after"]["structural_sparsity"] == 0.5
    model, _ = load_pretrained(tmp_path / "b")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
