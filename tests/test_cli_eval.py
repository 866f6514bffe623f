"""`agent-prune eval` input errors: one line on stderr, exit code 2, no traceback (run as a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_prune", "eval", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_model_path(tmp_path):
    assert_one_line_error(run_eval("--model", str(tmp_path / "missing.gguf"), "--data-dir", str(tmp_path)),
                          "does not exist")


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("notes.txt", "not a model", "not a .gguf model"),
    ("fake.gguf", "not a model either", "not a GGUF file"),
])
def test_a_file_that_is_not_a_model(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    assert_one_line_error(run_eval("--model", str(path), "--data-dir", str(tmp_path)), fragment)


def test_unknown_task(tmp_path):
    assert_one_line_error(run_eval("--model", "x.gguf", "--tasks", "wikitext2,trivia", "--data-dir",
                                   str(tmp_path)), "unknown task trivia")


def test_missing_data_directory(tmp_path):
    assert_one_line_error(run_eval("--model", "x.gguf", "--data-dir", str(tmp_path / "nowhere")),
                          "does not exist")


def test_non_positive_windows(tmp_path):
    assert_one_line_error(run_eval("--model", "x.gguf", "--windows", "0", "--data-dir", str(tmp_path)),
                          "--windows must be at least 1")


def test_compute_dtype_evaluates_a_bfloat16_copy(tmp_path):
    import json

    from tests.conftest import save_tiny
    from tests.tiny_data import write_data_dir

    save_tiny(tmp_path / "model", "llama", num_hidden_layers=2)
    write_data_dir(tmp_path / "data", questions=8)
    results = {}
    for dtype in ("float32", "bfloat16"):
        done = run_eval("--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--tasks",
                        "wikitext2", "--seqlen", "32", "--windows", "2", "--compute-dtype", dtype, "--json",
                        "--quiet")
        assert done.returncode == 0, done.stderr
        results[dtype] = json.loads(done.stdout)["wikitext2"]
        assert results[dtype]["dtype"] == dtype  # what the forwards multiplied in
    assert results["bfloat16"]["nll"] != results["float32"]["nll"]
    assert results["bfloat16"]["nll"] == pytest.approx(results["float32"]["nll"], abs=0.02)
