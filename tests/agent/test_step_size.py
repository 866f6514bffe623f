"""The default step: one layer's worth of prunable parameters, so both candidates of the first step
remove about one layer's worth (the depth candidate exactly one layer)."""

import pytest

from agent_prune.agent.graph import run_graph
from agent_prune.agent.runtime import RunContext
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options


def test_the_default_step_is_one_layers_worth(tmp_path):
    options = tiny_run_options(tmp_path, step_fraction=None, target_sparsity=0.5, max_iterations=1,
                               final_eval={"windows": 0, "speed": False})
    run_graph(RunContext(options))
    records = read_trace(tmp_path / "run" / "trace.jsonl")
    plan = next(r for r in records if r["event"] == "plan")
    assert plan["context"]["step_budget_fraction"] == pytest.approx(1 / 6, abs=1e-6)
    depth = next(r for r in records if r["event"] == "candidate_built" and r["branch"] == "depth")
    assert len(depth["actions"][0]["layers"]) == 1
