"""``--device-map auto`` and ``--max-memory``: accelerate's keys and sizes, the offload decision from
the caps, and one-line errors that name the fix."""

import pytest
import torch
from pydantic import ValidationError

from agent_prune.agent.options import RunOptions
from agent_prune.errors import InputError
from agent_prune.models.placement import layer_device_map, layer_home, memory_caps, parse_max_memory
from tests.conftest import tiny_model
from tests.test_cli_run import cli

CPU = torch.device("cpu")


def test_caps_read_as_accelerate_reads_them():
    assert parse_max_memory("cpu=300MiB, 0=20GiB") == {"cpu": "300MiB", "0": "20GiB"}
    assert memory_caps({"cpu": "300MiB", "0": "20GiB", "disk": "1000"}) == {
        "cpu": 300 * 2**20, 0: 20 * 2**30, "disk": 1000}


@pytest.mark.parametrize("text, words", [
    ("cpu", "is not DEVICE=SIZE"), (" , ", "names no device"), ("gpu=1GiB", "unknown device 'gpu'"),
    ("cpu=300XB", "'300XB' is not a size"), ("cpu=0", "not a positive size"),
])
def test_bad_caps_are_one_line_errors_naming_the_fix(text, words):
    with pytest.raises(InputError, match=words) as info:
        memory_caps(parse_max_memory(text))
    assert info.value.hint and "\n" not in info.value.one_line()


def test_run_options_take_caps_only_with_a_device_map(tmp_path):
    base = {"model": "m", "out": str(tmp_path / "r"), "target_sparsity": 0.1}
    assert RunOptions(**base).device_map is None and RunOptions(**base).max_memory is None
    assert RunOptions(**base, device_map="auto", max_memory={"cpu": "1GiB"}).max_memory == {"cpu": "1GiB"}
    for extra, words in [({"max_memory": {"cpu": "1GiB"}}, "device-map auto"),
                         ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "'lots' is not a size"),
                         ({"device_map": "balanced"}, "auto")]:
        with pytest.raises(ValidationError, match=words):
            RunOptions(**base, **extra)


def test_the_caps_decide_whether_and_where_layers_go():
    with torch.device("meta"):
        model = tiny_model("llama", num_hidden_layers=6)  # about 0.8 MB in float32; 123 KB a layer
    assert layer_home(model, "model.layers", CPU, None) is None  # what is free holds it
    assert layer_home(model, "model.layers", CPU, {"cpu": "1GiB"}) is None
    assert layer_home(model, "model.layers", CPU, {"cpu": "300KiB"}) == "disk"
    gpu = torch.device("cuda:0")  # a decision from sizes only: no GPU needed
    assert layer_home(model, "model.layers", gpu, {"0": "300KiB", "cpu": "1GiB"}) == "cpu"
    assert layer_home(model, "model.layers", gpu, {"0": "300KiB", "cpu": "400KiB"}) == "disk"
    with pytest.raises(InputError, match=r"cpu=100KiB is less than the modules outside the decoder "
                                         r"layers and one layer \(249KiB\)") as info:
        layer_home(model, "model.layers", CPU, {"cpu": "100KiB"})
    assert info.value.hint == "give the run's device at least 249KiB"
    with pytest.raises(InputError, match="names GPU 0 but the run works on cpu"):
        layer_home(model, "model.layers", CPU, {"0": "1GiB", "cpu": "1GiB"})
    device_map = layer_device_map(model, "model.layers", CPU)
    assert device_map == {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "disk" for i in range(6)},
                          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("flags, words", [
    (["--max-memory", "cpu=300MiB"], "device-map auto"),
    (["--device-map", "auto", "--max-memory", "gpu=1GiB"], "unknown device 'gpu'"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots' is not a size"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, words):
    result = cli("run", "--model", "m", "--out", tmp_path / "r", "--target-sparsity", "0.2", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr
