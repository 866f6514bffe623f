"""An LLM planner inside a real (tiny) run: whatever the server does, the run reaches its target and
the trace says what each planner call came to."""

from __future__ import annotations

import json

from agent_prune.agent.reporter import Reporter
from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options
from tests.chat_server import ChatServer, completion, error


class Collect(Reporter):
    def __init__(self):
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def plan_events(tmp_path) -> list[dict]:
    return [r for r in read_trace(tmp_path / "run" / "trace.jsonl") if r["event"] == "plan"]


def test_run_with_a_server_planner(tmp_path):
    reply = completion(json.dumps({"rationale": "Thin every layer a little.", "depth": None,
                                   "width": {"layers": [], "mlp_share": 1.0}}))
    with ChatServer() as server:
        server.add(*[reply] * 40)
        summary = start_run(tiny_run_options(tmp_path, planner=f"openai:m@{server.url}"))
    assert summary["status"] == "target_reached"
    events = plan_events(tmp_path)
    assert events and {e["status"] for e in events} == {"valid"}
    assert all(e["attempts"][0]["reasoning"] == "Thin every layer a little." for e in events)


def test_run_with_a_failing_server_falls_back_every_step(tmp_path):
    reporter = Collect()
    with ChatServer() as server:
        server.add(*[error(500, "boom")] * 200)
        options = tiny_run_options(tmp_path, planner=f"openai:m@{server.url}",
                                   planner_options={"backoff_s": 0.01, "max_retries": 1})
        summary = start_run(options, reporter=reporter)
    assert summary["status"] == "target_reached"
    events = plan_events(tmp_path)
    assert events and {e["status"] for e in events} == {"fallback"}
    assert all("server error (HTTP 500: boom)" in e["fallback_reason"] for e in events)
    assert any("retrying" in w for w in reporter.warnings)
    assert any("heuristic planner proposes" in w for w in reporter.warnings)
