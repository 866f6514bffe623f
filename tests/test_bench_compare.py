"""The comparison bench end to end on a tiny model and the tiny data directory, and its pure parts."""

import json
import os
from pathlib import Path

import pytest
import torch

from agent_prune.actions import dense_manifest
from bench.compare import report
from bench.compare.__main__ import main
from bench.compare.agent_run import run_peak_mib
from bench.compare.methods import (
    MAX_LAYER_CUT,
    channels_per_layer,
    layer_params,
    mop_width_actions,
    shortgpt_actions,
    wanda_sp_scores,
    width_actions,
)
from tests.conftest import save_tiny, tiny_model
from tests.tiny_data import write_data_dir

TARGET = 0.2
# One-shot baselines without recovery here (the loops exercise reconstruction); the real run has both.
ROWS = {"shortgpt/none/0.2", "wanda_sp/none/0.2", "l2_global/none/0.2", "taylor_global/none/0.2",
        "mop/reconstruct/0.2", "agent:heuristic/reconstruct/0.2"}


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("AGENT_PRUNE_TEST_THREADS", "1")


def _tiny_argv(tmp_path, *extra: str) -> list[str]:
    model = save_tiny(tmp_path / "model", "llama", num_hidden_layers=10)
    data = write_data_dir(tmp_path / "data")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n\n## Recovery\n\nkept as it is\n")
    return ["--model", str(model), "--data-dir", str(data), "--targets", str(TARGET), "--seqlen", "32",
            "--calib-samples", "4", "--calib-seqlen", "32", "--windows", "4", "--freebaseqa", "8",
            "--arc", "8",
            "--agent-option", "eval_windows=4", "--agent-option", "probe_limit=8",
            "--agent-option", "kl_windows=2", "--work", str(tmp_path / "work"),
            "--json-out", str(tmp_path / "compare.json"), "--doc", str(tmp_path / "docs" / "benchmarks.md"),
            "--plot", str(tmp_path / "docs" / "compare.png"), *extra]


def test_every_method_reaches_the_target_and_the_table_is_written(tmp_path, threads):
    argv = _tiny_argv(tmp_path, "--one-shot-recovery", "none")
    result = main(argv)

    assert set(result["rows"]) == ROWS
    assert result["machine"]["device"] == "cpu" and result["machine"]["gpu"] is None
    dense_params = result["dense"]["eval"]["params"]
    for rid, row in result["rows"].items():
        assert abs(row["eval"]["sparsity"] - TARGET) <= 0.03, rid
        assert row["eval"]["params"] < dense_params
        assert row["export"]["file_bytes"] < result["dense"]["export"]["file_bytes"]
        assert row["cost"]["peak_rss_mib"] > 0 and row["cost"]["seconds"] > 0
        for task in ("wikitext2", "freebaseqa", "arc_easy"):
            assert task in row["eval"]["tasks"]
        assert row["id"] in result["speed"]["0.2"]
    agent = next(row for row in result["rows"].values() if row["method"] == "agent")
    assert run_peak_mib(Path(agent["state"]).parents[1]) > 0  # its trace has per-node peaks
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["rows"]) == ROWS and saved["verdicts"]
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Recovery\n\nkept as it is" in doc and report.SECTION in doc
    assert doc.count("| ShortGPT (BI depth) |") == 2  # in both tables
    assert "](compare.png)" in doc
    assert (tmp_path / "docs" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun reuses every state and evaluation: nothing is exported again.
    exports = {rid: os.stat(row["export"]["export"]).st_mtime_ns for rid, row in result["rows"].items()}
    again = main([*argv, "--no-speed"])
    assert {rid: os.stat(r["export"]["export"]).st_mtime_ns for rid, r in again["rows"].items()} == exports
    row = f"shortgpt/none/{TARGET:g}"
    assert again["rows"][row]["eval"] == result["rows"][row]["eval"]


def test_device_reaches_every_worker(tmp_path, monkeypatch):
    import bench.compare.__main__ as compare

    commands = []
    monkeypatch.setattr(compare.subprocess, "run", lambda command, **_: commands.append(command))
    args = compare.parse_args(["--model", "m", "--data-dir", "d", "--device", "cuda"])
    for job in ("oneshot", "mop", "agent", "evaluate"):
        compare.worker(args, job, tmp_path, 0.2)
    assert all(c[c.index("--device") + 1] == "cuda" for c in commands) and len(commands) == 4
    assert compare.parse_args(["--model", "m", "--data-dir", "d"]).device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_method_runs_on_cuda(tmp_path, threads):
    """The whole comparison with ``--device cuda``, one-shot reconstruction included (GPU machines only)."""
    result = main(_tiny_argv(tmp_path, "--device", "cuda"))

    recovered = {"shortgpt/reconstruct/0.2", "wanda_sp/reconstruct/0.2", "l2_global/reconstruct/0.2",
                 "taylor_global/reconstruct/0.2"}
    assert set(result["rows"]) == ROWS | recovered
    assert result["machine"]["device"] == "cuda" and result["machine"]["gpu"]
    for rid, row in result["rows"].items():
        assert abs(row["eval"]["sparsity"] - TARGET) <= 0.03, rid
        assert row["id"] in result["speed"]["0.2"]
    assert "GPU" in (tmp_path / "docs" / "benchmarks.md").read_text()


def test_shortgpt_removes_the_lowest_block_influence_layers():
    manifest = dense_manifest(tiny_model("llama", num_hidden_layers=10))
    influence = [0.9, 0.2, 0.5, 0.1, 0.8, 0.3, 0.7, 0.6, 0.4, 1.0]
    (action,) = shortgpt_actions(influence, manifest, 0.3)
    assert action.layers == [1, 3, 5]


def test_wanda_sp_scores_follow_flap():
    torch.manual_seed(0)
    o_weight, down = torch.randn(8, 8), torch.randn(8, 6)
    o_norm, down_norm = torch.rand(8), torch.rand(6)
    scores = wanda_sp_scores(o_weight, o_norm, down, down_norm, head_dim=2, num_kv_heads=2)
    per_column = (o_weight.abs() * o_norm).mean(dim=0)
    assert scores["heads"] == pytest.approx([float(per_column[2 * h: 2 * h + 2].sum()) for h in range(4)])
    assert scores["mlp_channels"] == pytest.approx((down.abs() * down_norm).mean(dim=0).tolist())
    assert scores["kv_groups"] == pytest.approx([scores["heads"][0] + scores["heads"][1],
                                                 scores["heads"][2] + scores["heads"][3]])


def test_mop_width_spends_one_layer_and_drops_kv_groups_when_the_count_reaches_one():
    manifest = dense_manifest(tiny_model("llama", num_hidden_layers=4))
    budget = layer_params(manifest, 0)
    actions, credit = mop_width_actions(manifest, budget, {})
    assert len(actions) == 4 and all(a.kv_groups is None for a in actions)
    hidden = manifest.base.hidden_size
    assert sum(a.mlp_channels for a in actions) * 3 * hidden == pytest.approx(budget, rel=0.02)
    actions, credit = mop_width_actions(manifest, budget, {source: 0.99 for source in range(4)})
    assert all(a.kv_groups == 1 for a in actions)
    assert all(0 <= value < 1 for value in credit.values())


def test_one_shot_width_cuts_the_target_from_the_lowest_standardised_scores():
    manifest = dense_manifest(tiny_model("llama", num_hidden_layers=4))
    size = manifest.layers[0].widths().intermediate_size
    # Layer 2's scores are flat (z = 0 everywhere) while the others have a clear tail of low channels.
    tail = [float(i) for i in range(size)]
    scores = [tail, tail, [1.0] * size, tail]
    target = 0.1
    actions = width_actions(scores, manifest, target)
    removed = sum(a.mlp_channels for a in actions) * 3 * manifest.base.hidden_size
    assert removed == pytest.approx(target * manifest.base.prunable_parameters, rel=0.05)
    assert 2 not in {a.layer for a in actions}
    assert channels_per_layer(scores, 10, "even") == [3, 3, 2, 2]
    capped = channels_per_layer(scores, 4 * size, "global")
    assert capped == [int(MAX_LAYER_CUT * size)] * 4


def test_a_loop_runs_peak_is_its_largest_node_peak(tmp_path):
    """The loop resets the kernel's high-water mark at every node, so the worker's own figure at the
    end is the last node's; the run's peak is the largest ``node`` record of its trace."""
    assert run_peak_mib(tmp_path) == 0.0  # no trace yet
    records = [{"event": "node", "node": "build", "peak_rss_mb": 100.0},
               {"event": "phase", "phase": "export", "peak_rss_mb": 900.0},  # a phase's peak is in its node's
               {"event": "node", "node": "evaluate", "peak_rss_mb": 300.0},
               {"event": "node", "node": "finish", "peak_rss_mb": 200.0}]
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_peak_mib(tmp_path) == 300.0
