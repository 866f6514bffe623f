"""Gate violations roll back and reflect; a killed run resumes to the same accepted steps."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from agent_prune.agent.session import resume_run, start_run
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options
from tests.chat_server import ChatServer, hold_request

ROOT = Path(__file__).resolve().parents[2]


def accepted_steps(run_dir: Path) -> list[tuple]:
    return [(r["iteration"], r["branch"]) for r in read_trace(run_dir / "trace.jsonl")
            if r["event"] == "decision" and r["accepted"]]


def test_forced_gate_violation_reflects_rolls_back_and_finishes(tmp_path):
    # Every unrecovered step raises in-loop perplexity a little; a gate of 0 (with z=0) rejects any
    # rise. (With reconstruction a tiny random model's step can come out no worse, so none here.)
    options = tiny_run_options(tmp_path, gates={"max_step_ppl_increase": 0.0, "z": 0.0}, recovery="none",
                               max_rejections=2, final_eval={"windows": 0, "speed": False})
    summary = start_run(options)
    events = read_trace(Path(options.out) / "trace.jsonl")
    kinds = [e["event"] for e in events]
    rejected = [e for e in events if e["event"] == "decision" and not e["accepted"]]
    assert rejected, "the zero gate should reject at least one step"
    assert "FAIL" in rejected[0]["reason"]
    assert "reflection" in kinds and "rollback" in kinds
    rollback = next(e for e in events if e["event"] == "rollback")
    accepted_before = [e for e in events if e["event"] == "decision" and e["accepted"]
                       and e["iteration"] < rollback["iteration"]]
    assert rollback["to_step"] == len(accepted_before)  # back to the last good step
    assert summary["status"] in ("no_acceptable_step", "target_reached", "max_iterations")
    assert "finish" in kinds
    # The plan after a rejection sees the reflection and the layers it must avoid.
    plans = [e for e in events if e["event"] == "plan"]
    assert any(p["context"]["reflections"] for p in plans[1:])


def test_killed_run_resumes_to_the_same_accepted_steps(tmp_path):
    # With reconstruction, so resuming must replay refit weights, not only re-cut.
    reference = tiny_run_options(tmp_path / "a", final_eval={"windows": 0, "speed": False},
                                 recovery="reconstruct")
    start_run(reference)
    expected = accepted_steps(Path(reference.out))
    assert len(expected) >= 2

    with ChatServer() as server:
        # The planner is a local chat server that fails the first request (the heuristic steps in, as
        # in the reference run) and holds the second: the kill lands while the run waits for it,
        # after the first iteration's decision, whatever the machine's load.
        killed = tiny_run_options(tmp_path / "b", final_eval={"windows": 0, "speed": False},
                                  recovery="reconstruct", planner=f"openai:test-model@{server.url}",
                                  planner_options={"max_retries": 0})
        arrived = hold_request(server, 2)
        script = ("import json,sys; from agent_prune.agent.options import RunOptions; "
                  "from agent_prune.agent.session import start_run; "
                  "start_run(RunOptions.model_validate(json.loads(sys.argv[1])))")
        env = {**os.environ, "AGENT_PRUNE_TEST_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(killed.model_dump())], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not arrived.wait(1.0):  # only notices a run that ended without asking
            assert proc.poll() is None, "the run ended before its second planner request"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        trace = Path(killed.out) / "trace.jsonl"
        summary = resume_run(killed.out)
        assert summary["status"] == "target_reached"
        assert accepted_steps(Path(killed.out)) == expected
        events = [e["event"] for e in read_trace(trace)]
        assert "resume" in events

