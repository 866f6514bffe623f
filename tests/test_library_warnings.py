"""The KV-cache code (speed, scoring, the in-process planner's skeleton decoder) uses the cache API of
the installed transformers: no deprecation warning reaches a user. Run in a fresh process, because
transformers logs each deprecation only once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import save_tiny

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, logging, sys, warnings

import torch
from transformers.utils import logging as hf_logging

from agent_prune.agent.planners.hf_chat import HFChat
from agent_prune.agent.planners.slots import Slot
from agent_prune.evaluation.scoring import ScoringRequest, continuation_logliks, greedy_generate
from agent_prune.evaluation.speed import measure_speed
from agent_prune.models.loading import load_model

torch.set_num_threads(1)
records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
hf_logging.get_logger("transformers").addHandler(handler)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = load_model(sys.argv[1])
    model = loaded.model
    measure_speed({"a": model}, seqlen=16, context=8, decode_tokens=2, reps=1)
    continuation_logliks(model, [ScoringRequest((1, 2, 3), ((4, 5, 6), (7,)))], pad_id=0)
    greedy_generate(model, [[1, 2, 3]], pad_id=0, eos_id=None, max_new_tokens=3)
    chat = HFChat(sys.argv[1], max_tokens=8)
    chat._loaded = loaded
    chat._fill("Say something: ", ['{"text": "', Slot("text"), '"}'])
print(json.dumps({"warnings": [str(w.message) for w in caught], "logged": records}))
"""


def test_kv_cache_code_prints_no_library_warnings(tmp_path):
    folder = save_tiny(tmp_path / "model")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"warnings": [], "logged": []}
    assert "deprecated" not in result.stderr


def test_cli_loading_a_gguf_prints_no_library_progress_bar(tmp_path):
    """transformers dequantises a GGUF under a plain tqdm bar that its own switch does not reach; the
    CLI's output carries only its own progress."""
    from agent_prune.actions import dense_manifest
    from agent_prune.models.gguf_export import export_gguf
    from tests.conftest import tiny_merged_tokenizer, tiny_model

    model = tiny_model("llama")
    export_gguf(model, tiny_merged_tokenizer(), tmp_path / "tiny.gguf", dense_manifest(model), quant="F32")
    actions = tmp_path / "actions.json"
    actions.write_text('[{"kind": "remove_layers", "layers": [1]}]')
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["AGENT_PRUNE_CACHE"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "agent_prune", "apply", "--model", str(tmp_path / "tiny.gguf"),
               "--actions", str(actions), "--out", str(tmp_path / "out")]
    result = subprocess.run(command,
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "config.json").exists()
    assert "de-quantizing" not in result.stderr and "it/s]" not in result.stderr
