import json

import pytest

from agent_prune.errors import InputError
from agent_prune.sensitivity import SensitivityProfile, profile_model
from tests.sensitivity.test_sensitivity_streaming import windows


@pytest.fixture(scope="module")
def profile():
    from tests.conftest import tiny_model

    return profile_model(tiny_model("qwen2"), windows(), dataset="unit", seed=7)


def test_json_round_trip_and_plain_layout(profile, tmp_path):
    path = profile.save(tmp_path / "sub" / "profile.json")
    assert SensitivityProfile.load(path) == profile
    data = json.loads(path.read_text())  # readable without our code
    assert data["schema_version"] == 1
    assert data["calibration"] | {"digest": None} == {
        "dataset": "unit", "samples": 6, "seqlen": 24, "seed": 7, "tokens": 144, "digest": None}
    assert len(data["layers"]) == 4
    for i, layer in enumerate(data["layers"]):
        assert layer["index"] == i and layer["source"] == i
        for key in ("block_influence", "angular_distance", "wanda", "wanda_p10", "gradient", "taylor"):
            assert isinstance(layer[key], float)
            assert isinstance(layer["z"][key], float)
        assert len(layer["structures"]["kv_groups"]) == layer["num_kv_heads"] == 2
        assert len(layer["structures"]["heads"]) == layer["num_heads"] == 4
        assert len(layer["structures"]["mlp_channels"]) == layer["intermediate_size"] == 96
        assert len(layer["structures_taylor"]["mlp_channels"]) == 96
    assert set(data["definitions"]) >= {"wanda", "gradient", "block_influence", "structures"}
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["profile.json"]  # no temp files left


def test_zscores_across_layers_have_mean_zero_and_std_one(profile):
    for metric in ("block_influence", "wanda", "gradient", "taylor"):
        z = profile.zscore(metric)
        assert sum(z) / len(z) == pytest.approx(0.0, abs=1e-9)
        assert (sum(v * v for v in z) / len(z)) ** 0.5 == pytest.approx(1.0, abs=1e-4)  # eps-shrunk


def test_other_schema_versions_and_garbage_are_clear_errors(profile, tmp_path):
    data = json.loads(profile.to_json())
    data["schema_version"] = 99
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="schema version 99"):
        SensitivityProfile.load(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read profile"):
        SensitivityProfile.load(tmp_path / "bad.json")
    del data["layers"]
    data["schema_version"] = 1
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="malformed"):
        SensitivityProfile.load(tmp_path / "short.json")


def test_fingerprint_changes_when_the_model_changes():
    import torch

    from agent_prune.models.adapters import adapter_for
    from agent_prune.sensitivity import model_fingerprint
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_model("llama")) == before
    with torch.no_grad():
        adapter_for(model).layers()[1].mlp.up_proj.weight.mul_(0.9)
    assert model_fingerprint(model) != before
