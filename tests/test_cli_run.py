"""The CLI's exit codes and --json output, through real subprocesses on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent.loop_fixtures import tiny_run_options

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "AGENT_PRUNE_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_prune", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600, **kwargs)


def write_config(tmp_path: Path, **overrides) -> Path:
    options = tiny_run_options(tmp_path, final_eval={"windows": 0, "speed": False}, **overrides)
    payload = options.model_dump(exclude={"out"})
    lines = []
    tables = {k: v for k, v in payload.items() if isinstance(v, dict)}
    for key, value in payload.items():
        if value is not None and key not in tables:
            lines.append(f"{key} = {json.dumps(value)}")
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_not_reaching_target_exits_1_with_json(tmp_path):
    config = write_config(tmp_path, target_sparsity=0.6, max_iterations=1)
    result = cli("run", "--config", config, "--out", tmp_path / "r", "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "max_iterations"
    assert 0 < summary["sparsity"] < 0.6
    assert "target not reached" in result.stderr
    trace = cli("trace", tmp_path / "r", "--json")
    assert trace.returncode == 0
    records = json.loads(trace.stdout)["records"]
    assert any(r["event"] == "plan" for r in records)
    text = cli("trace", tmp_path / "r", "--iteration", "1")
    assert text.returncode == 0 and "raw reply" in text.stdout


def test_interrupted_run_exits_130_and_resumes_to_0(tmp_path):
    config = write_config(tmp_path, target_sparsity=0.3)
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "agent_prune", "run", "--config", str(config),
                             "--out", str(run_dir), "--quiet"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trace = run_dir / "trace.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if trace.is_file() and '"event": "plan"' in trace.read_text():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with: agent-prune resume" in err
    assert "Traceback" not in err
    resumed = cli("resume", run_dir, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "target_reached"
    again = cli("resume", run_dir)  # a finished run: nothing redone, its closing summary shown
    assert again.returncode == 0, again.stderr
    assert "target_reached" in again.stderr and "structural sparsity" in again.stderr
    assert f"model: {run_dir}" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "/no/such/model", "--out", "{tmp}/r", "--target-sparsity", "0.2"], "does not exist"),
    (["run", "--model", "{model}", "--out", "{tmp}/r", "--target-sparsity", "1.5"], "target-sparsity"),
    (["run", "--model", "{model}", "--out", "{tmp}/r", "--target-sparsity", "0.2",
      "--planner", "nonsense"], "planner"),
    (["run", "--model", "{model}", "--target-sparsity", "0.2"], "--out is required"),
    (["resume", "{tmp}"], "not a run directory"),
    (["trace", "{tmp}"], "no trace.jsonl"),
    (["export", "{tmp}", "--out", "{tmp}/x"], "not a run directory"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    model = tiny_run_options(tmp_path).model
    result = cli(*[a.format(tmp=tmp_path, model=model) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "r").exists()  # nothing written for bad input
