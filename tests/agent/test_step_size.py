"""The default step: three layers' worth of prunable parameters, so both candidates of the first step
remove about three layers' worth (the depth candidate exactly three layers); a remainder under half
a step joins the step that reaches the target."""

import pytest

from agent_prune.agent.graph import run_graph
from agent_prune.agent.runtime import RunContext
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options


def test_the_default_step_is_three_layers_worth(tmp_path):
    options = tiny_run_options(tmp_path, step_fraction=None, target_sparsity=0.5, max_iterations=1,
                               final_eval={"windows": 0, "speed": False})
    run_graph(RunContext(options))
    records = read_trace(tmp_path / "run" / "trace.jsonl")
    plan = next(r for r in records if r["event"] == "plan")
    assert plan["context"]["step_budget_fraction"] == pytest.approx(3 / 6, abs=1e-6)
    depth = next(r for r in records if r["event"] == "candidate_built" and r["branch"] == "depth")
    assert len(depth["actions"][0]["layers"]) == 3


def test_a_small_remainder_joins_the_step_that_reaches_the_target(tmp_path):
    """24% in steps of one layer's worth (16.7%): the 7.3% left after one step is under half a step,
    so the first step takes all 24%. Depth cannot match it without passing the target (two layers are
    33%), so it removes one layer and width takes the whole remainder: no sliver of a second step."""
    options = tiny_run_options(tmp_path, target_sparsity=0.24, max_iterations=1,
                               final_eval={"windows": 0, "speed": False})
    run_graph(RunContext(options))
    records = read_trace(tmp_path / "run" / "trace.jsonl")
    plan = next(r for r in records if r["event"] == "plan")
    assert plan["context"]["step_budget_fraction"] == pytest.approx(0.24, abs=1e-4)
    assert plan["context"]["remaining_params"] - plan["context"]["step_budget_params"] in (0, 1)
    built = {r["branch"]: r for r in records if r["event"] == "candidate_built"}
    assert len(built["depth"]["actions"][0]["layers"]) == 1
    assert built["depth"]["sparsity"] == pytest.approx(1 / 6, abs=1e-3)
    assert built["width"]["sparsity"] == pytest.approx(0.24, abs=0.01)
    assert built["width"]["sparsity"] <= 0.24
