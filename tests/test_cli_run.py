"""The CLI's exit codes and --json output, through real subprocesses on a tiny model."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options
from tests.chat_server import ChatServer, hold_request

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


def start_held_run(tmp_path: Path, server: ChatServer, at_request: int = 2, new_session: bool = False,
                   **overrides) -> tuple:
    """Start a run whose planner is the test's chat server, held at its ``at_request``-th request;
    ``new_session``: in a process group of its own, as a terminal's foreground job is.

    The first request fails (the heuristic planner steps in), so request 2 comes after the first
    iteration's decision is checkpointed; it is never answered, so the run is blocked inside it.
    """
    config = write_config(tmp_path, target_sparsity=0.3, planner=f"openai:test-model@{server.url}",
                          planner_options={"max_retries": 0}, **overrides)
    run_dir = tmp_path / "r"
    arrived = hold_request(server, at_request)
    err = (tmp_path / "stderr.txt").open("w")
    # A shell that starts jobs in the background leaves SIGINT ignored for its children; give the run
    # the default disposition a user's terminal gives it, whatever launched the test suite.
    proc = subprocess.Popen([sys.executable, "-m", "agent_prune", "run", "--config", str(config),
                             "--out", str(run_dir), "--quiet"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=new_session,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not arrived.wait(1.0):  # not a timing guess: only notices a run that ended early
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
    return proc, run_dir


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_stopped_run_exits_with_its_code_and_resumes_to_0(tmp_path, sig, code, word):
    with ChatServer() as server:
        proc, run_dir = start_held_run(tmp_path, server)
        proc.send_signal(sig)
        assert proc.wait(timeout=300) == code
        err = (tmp_path / "stderr.txt").read_text()
        assert f"{word}; resume with: agent-prune resume {run_dir}" in err, err
        assert "Traceback" not in err
        resumed = cli("resume", run_dir, "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "target_reached"
    decisions = [r for r in read_trace(run_dir / "trace.jsonl") if r["event"] == "decision"]
    assert [d["iteration"] for d in decisions] == sorted({d["iteration"] for d in decisions})  # none redone
    again = cli("resume", run_dir)  # a finished run: nothing redone, its closing summary shown
    assert again.returncode == 0, again.stderr
    assert "target_reached" in again.stderr and "structural sparsity" in again.stderr
    assert f"model: {run_dir}" in again.stderr


def worker_processes(parent: int) -> list[int]:
    """The pids of ``parent``'s worker processes (multiprocessing's spawned children)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process table from /proc")
def test_ctrl_c_stops_the_workers_and_the_run_resumes(tmp_path):
    with ChatServer() as server:
        proc, run_dir = start_held_run(tmp_path, server, new_session=True, workers=2)
        workers = worker_processes(proc.pid)  # started for the first iteration, idle now
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the job
        assert proc.wait(timeout=300) == 130
        err = (tmp_path / "stderr.txt").read_text()
        assert f"interrupted; resume with: agent-prune resume {run_dir}" in err, err
        assert "Traceback" not in err
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        resumed = cli("resume", run_dir, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "target_reached"


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


@pytest.mark.parametrize("exc, words", [
    (RuntimeError("index 7 is out of bounds\n  for dimension 0"),
     "crashed with RuntimeError: index 7 is out of bounds for dimension 0; this is a bug"),
    (MemoryError(), "out of memory (MemoryError)"),
])
def test_crash_exits_3_with_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys, exc,
                                                                   words):
    from agent_prune.agent import session
    from agent_prune.cli import main

    def crash(options, reporter=None):  # stands in for a bug (or OOM) anywhere inside a run
        raise exc

    monkeypatch.setattr(session, "start_run", crash)
    argv = ["run", "--model", "m", "--out", str(tmp_path / "r"), "--target-sparsity", "0.2", "--quiet"]
    assert main(argv) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert "rerun with --debug for the traceback" in lines[0]
    assert f"resume with: agent-prune resume {tmp_path / 'r'}" in lines[0]
    assert main(["--debug", *argv]) == 3  # same exit code, traceback first
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1] == lines[0]


def test_the_trace_says_which_candidate_went_unprobed_and_why():
    from rich.console import Console

    from agent_prune.reporting.timeline import render_iteration

    why = "max_step_ppl_increase 0.669 vs 0.5 (FAIL)"
    events = [{"event": "candidate_scored", "branch": "depth", "probes_skipped": why,
               "metrics": {"perplexity": {"value": 35.6, "se": 2.6}}},
              {"event": "candidate_scored", "branch": "width",
               "metrics": {"perplexity": {"value": 27.2, "se": 2.0},
                           "mc_accuracy": {"value": 0.41, "se": 0.05}}}]
    console = Console(record=True, width=200)
    console.print(render_iteration(1, events))
    text = console.export_text()
    assert "depth ppl 35.6 ± 2.6  (not probed: max_step_ppl_increase 0.669 vs 0.5 (FAIL))" in text
    assert "width ppl 27.2 ± 2  probe acc 41.0% ± 5.0%" in text and text.count("not probed") == 1
