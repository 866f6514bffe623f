"""Every kind of file a user hands over, cut short or corrupt: one ``error:`` line naming the file and
the fix, exit code 2, no traceback, and nothing written (the CLI's ``main`` in process, one subprocess
for the issue's own reproduction)."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from langgraph.checkpoint.sqlite import SqliteSaver

from agent_prune.cli import main
from tests.agent.loop_fixtures import tiny_run_options
from tests.conftest import SHARED_GGUF, save_tiny
from tests.tiny_data import write_data_dir

ROOT = Path(__file__).resolve().parents[1]


def truncate(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size and modification time (to show nothing changed)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def one_error_line(capsys, argv: list[str], *fragments: str) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    save_tiny(root / "model")
    write_data_dir(root / "data", questions=12)
    return root


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def small_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("blk.0.weight", np.ones((64, 64), dtype=np.float32))
    writer.add_tensor("blk.1.weight", np.ones((64, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep, fragment", [(100, "is not a complete GGUF file"), (-500, "is truncated")])
def test_truncated_gguf(tmp_path, tiny_files, capsys, keep, fragment):
    path = small_gguf(tmp_path / "m.gguf")
    truncate(path, keep if keep > 0 else path.stat().st_size + keep)
    one_error_line(capsys, ["eval", "--model", path, "--data-dir", tiny_files / "data", "--quiet"],
                   "m.gguf", fragment, "download or copy it again")


def test_truncated_gguf_from_the_issue_in_a_subprocess(tmp_path, tiny_files):
    """``head -c 4096 model.gguf > t.gguf`` then ``agent-prune eval --model t.gguf``."""
    if not SHARED_GGUF.is_file():
        pytest.skip(f"shared model not found at {SHARED_GGUF}")
    with SHARED_GGUF.open("rb") as fh:
        (tmp_path / "t.gguf").write_bytes(fh.read(4096))
    result = subprocess.run([sys.executable, "-m", "agent_prune", "eval", "--model", "t.gguf", "--data-dir",
                             str(tiny_files / "data")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "t.gguf is not a complete GGUF file" in result.stderr and "Traceback" not in result.stderr


def test_truncated_safetensors(tmp_path, tiny_files, capsys):
    model = copy_tree(tiny_files / "model", tmp_path / "model")
    truncate(model / "model.safetensors", 5000)
    one_error_line(capsys, ["eval", "--model", model, "--data-dir", tiny_files / "data", "--quiet"],
                   "model.safetensors is truncated", "download or copy it again")


def test_config_that_is_not_json(tmp_path, tiny_files, capsys):
    model = copy_tree(tiny_files / "model", tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 6')
    actions = '[{"kind": "remove_layers", "layers": [1]}]'
    one_error_line(capsys, ["apply", "--model", model, "--actions", actions, "--out", tmp_path / "out"],
                   "config.json is not valid JSON", "restore")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [("", "is empty"), ("  \n", "is empty"),
                                               ('[{"kind": "remove_layers", "lay', "not valid JSON")])
def test_bad_actions_file(tmp_path, tiny_files, capsys, content, fragment):
    actions = tmp_path / "actions.json"
    actions.write_text(content)
    one_error_line(capsys, ["apply", "--model", tiny_files / "model", "--actions", actions,
                            "--out", tmp_path / "out"], f"actions file {actions}", fragment, "JSON list")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as 'agent-prune run' leaves it after its first steps (no model work needed)."""
    from agent_prune.agent.graph import THREAD, build_graph
    from agent_prune.agent.runtime import RunContext
    from agent_prune.io import atomic_write_json

    options = tiny_run_options(tmp_path)
    folder = Path(options.out)
    atomic_write_json(folder / "run.json", {"options": options.model_dump()})
    ctx = RunContext(options)
    ctx.trace.event("start")
    with contextlib.closing(sqlite3.connect(folder / "state.sqlite")) as conn:  # empty checkpoint tables
        build_graph(ctx).compile(checkpointer=SqliteSaver(conn)).get_state(THREAD)
    return folder


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: truncate(d / "run.json", 40), "run.json is corrupt"),
    (lambda d: (d / "run.json").write_text('{"options": {"model": 1}}'), "run.json is corrupt"),
    (lambda d: (d / "state.sqlite").unlink(), "state.sqlite is missing"),
    (lambda d: truncate(d / "state.sqlite", 100), "state.sqlite is corrupt"),
    (lambda d: (d / "state.sqlite").write_bytes(b"not a database" * 100), "state.sqlite is corrupt"),
])
def test_damaged_run_directory(run_dir, capsys, damage, fragment):
    damage(run_dir)
    before = snapshot(run_dir)
    line = one_error_line(capsys, ["resume", run_dir], fragment)
    assert "restore it from a backup" in line or "agent-prune run" in line
    assert snapshot(run_dir) == before  # resume wrote nothing


def test_export_of_a_run_with_corrupt_run_json(run_dir, tmp_path, capsys):
    truncate(run_dir / "run.json", 10)
    one_error_line(capsys, ["export", run_dir, "--out", tmp_path / "x"], "run.json is corrupt")
    assert not (tmp_path / "x").exists()


def test_run_with_a_truncated_data_file_writes_nothing(tmp_path, tiny_files, capsys):
    data = copy_tree(tiny_files / "data", tmp_path / "data")
    c4 = data / "c4" / "c4_en_train_first1000.jsonl"
    truncate(c4, c4.stat().st_size - 7)
    one_error_line(capsys, ["run", "--model", tiny_files / "model", "--data-dir", data, "--out",
                            tmp_path / "r", "--target-sparsity", "0.2", "--quiet"],
                   f"{c4}:", "not valid JSON", "restore the file")
    assert not (tmp_path / "r").exists()


def test_eval_with_a_data_file_cut_inside_a_character(tmp_path, tiny_files, capsys):
    data = copy_tree(tiny_files / "data", tmp_path / "data")
    wikitext = data / "wikitext-2-raw" / "wikitext-2-raw-v1.test.jsonl"
    wikitext.write_bytes(wikitext.read_bytes() + '{"text": "caf\u00e9"}'.encode()[:-3])
    one_error_line(capsys, ["eval", "--model", tiny_files / "model", "--data-dir", data, "--seqlen", "32",
                            "--quiet"], f"{wikitext}:31", "truncated or corrupt")


def test_eval_with_a_truncated_csv(tmp_path, tiny_files, capsys):
    data = copy_tree(tiny_files / "data", tmp_path / "data")
    mmlu = data / "mc" / "mmlu_dev"
    mmlu.mkdir()
    (mmlu / "anatomy_dev.csv").write_text("question,choice0,choice1,choice2,choice3,answer\n"
                                          "What?,a,b,c,d,1\nWhy?,a,b")
    one_error_line(capsys, ["eval", "--model", tiny_files / "model", "--data-dir", data, "--tasks", "mmlu",
                            "--quiet"], "anatomy_dev.csv:3", "fewer fields")
