import json

from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options


def test_full_run_with_reconstruction_reaches_a_small_target(tmp_path):
    options = tiny_run_options(tmp_path, recovery="reconstruct")
    summary = start_run(options)
    assert summary["status"] == "target_reached", summary
    assert summary["sparsity"] >= 0.3 - 0.002
    run = tmp_path / "run"
    records = read_trace(run / "trace.jsonl")
    events = [r["event"] for r in records]
    for kind in ("start", "profile", "plan", "candidate_built", "candidate_scored", "decision", "finish"):
        assert kind in events
    built = [r for r in records if r["event"] == "candidate_built"]
    assert built and all(r["recovery"]["method"] == "reconstruct" for r in built), built
    assert (run / "model" / "config.json").is_file()
    assert (run / "report.md").is_file()
    saved = json.loads((run / "summary.json").read_text())
    assert saved["accepted_steps"] == summary["accepted_steps"] >= 1
