"""``agent_prune.prune``: the CLI's loop from Python, on a tiny model (object and README example)."""

import functools
import json
import re
from pathlib import Path

import pytest

import agent_prune
from agent_prune.errors import InputError
from agent_prune.models.accounting import count_parameters
from tests.agent.loop_fixtures import tiny_run_options
from tests.conftest import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The tiny data directory holds short rows: run options sized for it (the loop itself is unchanged).
SMALL = dict(seqlen=32, eval_windows=4, probe_limit=8, kl_windows=2, calib_samples=4, calib_seqlen=32,
             final_eval={"windows": 0, "seqlen": 32, "freebaseqa_limit": 8, "arc_limit": 8, "speed": False})


def test_prune_a_model_object_to_10_percent(tmp_path):
    data_dir = tiny_run_options(tmp_path).data_dir
    model = tiny_model("llama", num_hidden_layers=6)
    dense = count_parameters(model)
    result = agent_prune.prune(model, tiny_tokenizer(), target_sparsity=0.1, planner="heuristic",
                               out=tmp_path / "r", data_dir=data_dir, **SMALL)
    assert result.summary["status"] == "target_reached"
    assert result.summary["sparsity"] >= 0.1
    pruned = count_parameters(result.model, base_prunable=dense.prunable)
    assert pruned.structural_sparsity == pytest.approx(result.summary["sparsity"], abs=1e-6)
    assert (tmp_path / "r" / "trace.jsonl").is_file() and (tmp_path / "r" / "model").is_dir()
    assert result.manifest.is_structural


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's block, with the shared paths pointed at the tiny model and data."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- python-api-example[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    options = tiny_run_options(tmp_path)
    code = (block.replace("../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
                          options.model)
            .replace("../shared/data", options.data_dir).replace("runs/notebook-10", str(tmp_path / "nb")))
    namespace = {}
    monkeypatch.setattr(agent_prune, "prune", functools.partial(agent_prune.prune, **SMALL), raising=False)
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].summary["status"] == "target_reached"
    assert json.loads((tmp_path / "nb" / "summary.json").read_text())["sparsity"] >= 0.1


def test_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="tokenizer"):
        agent_prune.prune(tiny_model("llama"), target_sparsity=0.1, out=tmp_path / "r")
    with pytest.raises(InputError, match="target-sparsity"):
        agent_prune.prune(str(tmp_path), tiny_tokenizer(), target_sparsity=2.0, out=tmp_path / "r")
