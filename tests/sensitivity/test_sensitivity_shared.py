"""On the real shared model: Block Influence agrees with plain hidden states; the CLI works end to end."""

import json

import pytest
import torch

from agent_prune.cli import main
from agent_prune.data.corpora import c4_documents, calibration_windows
from agent_prune.sensitivity import SensitivityProfile, profile_model
from tests.conftest import SHARED_DATA, SHARED_GGUF

pytestmark = pytest.mark.integration


@torch.no_grad()
def test_block_influence_ranking_matches_output_hidden_states(shared_model):
    model, adapter = shared_model.model, shared_model.adapter
    windows = calibration_windows(shared_model.tokenizer, c4_documents(SHARED_DATA, limit=200), 4, 128, 0)
    profile = profile_model(model, windows, gradients=False, batch_size=4)
    last = []
    hook = adapter.layers()[-1].register_forward_hook(lambda m, a, o: last.append(o))
    states = model(windows, output_hidden_states=True).hidden_states
    hook.remove()
    raw = [*states[:-1], last[0]]  # transformers 5: hidden_states[-1] is after the final norm
    plain = [1 - float(torch.nn.functional.cosine_similarity(raw[i], raw[i + 1], dim=-1).mean())
             for i in range(adapter.num_layers)]
    ours = profile.metric("block_influence")
    assert ours == pytest.approx(plain, rel=1e-3, abs=1e-5)
    assert sorted(range(30), key=ours.__getitem__) == sorted(range(30), key=plain.__getitem__)
    # the model's super weight (zeroing it raises WikiText-2 perplexity ~9x) is found and protected
    assert (11, 507, 1229) in {(sw.layer, sw.row, sw.column) for sw in profile.super_weights}
    assert profile.is_protected(11, "mlp_channel", 1229) and profile.is_protected(11, "layer")


def test_profile_command_writes_json_and_prints_it(tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = main(["profile", "--model", str(SHARED_GGUF), "--data-dir", str(SHARED_DATA),
                 "--calib-samples", "2", "--seqlen", "64", "--out", str(out), "--json", "--quiet"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = SensitivityProfile.load(out)
    assert printed["layers"] == json.loads(out.read_text())["layers"]
    assert len(saved.layers) == 30 and saved.gradients
    assert saved.calibration.dataset == "c4" and saved.calibration.tokens == 128
    assert all(layer.gradient is not None and layer.gradient > 0 for layer in saved.layers)


def test_profile_command_rejects_bad_flags(tmp_path, capsys):
    code = main(["profile", "--model", str(SHARED_GGUF), "--data-dir", str(SHARED_DATA),
                 "--calib-samples", "0", "--out", str(tmp_path / "p.json")])
    assert code == 2
    assert "error: --calib-samples 0 is too small" in capsys.readouterr().err
