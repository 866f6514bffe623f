"""Candidate sizing: depth takes the prefix closest to the step budget; the loop builds a width
candidate (and one per alternative sizing) of the same size, so the paired comparison is between
equally small models."""

from agent_prune.agent.candidates import LayerSize, size_depth
from agent_prune.agent.proposal import DepthProposal
from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options


def sizes(*params: int) -> list[LayerSize]:
    return [LayerSize(index=i, params=p, num_heads=4, num_kv_heads=2, mlp_channels=64)
            for i, p in enumerate(params)]


def test_a_thinned_layer_just_under_the_budget_is_taken_alone():
    layers = sizes(100, 90, 90, 100)
    assert size_depth(DepthProposal(layers=[1, 2]), layers, budget=100) == [1]


def test_the_next_layer_is_taken_when_stopping_short_is_further():
    layers = sizes(100, 30, 80, 100)
    assert size_depth(DepthProposal(layers=[1, 2]), layers, budget=100) == [1, 2]


def test_depth_closes_when_the_closest_prefix_is_too_big_or_everything():
    assert size_depth(DepthProposal(layers=[0]), sizes(300, 100), budget=100) == []
    assert size_depth(DepthProposal(layers=[0, 1]), sizes(60, 60), budget=100) == []


def test_depth_and_width_candidates_remove_the_same_parameters(tmp_path):
    # A step of 15% of the prunable parameters: one of the 6 layers (16.7%) is the closest depth cut.
    summary = start_run(tiny_run_options(tmp_path, recovery="none", target_sparsity=0.4, step_fraction=0.15,
                                         final_eval={"windows": 0, "speed": False}))
    assert summary["accepted_steps"] >= 2
    built = {}
    for record in read_trace(tmp_path / "run" / "trace.jsonl"):
        if record["event"] == "candidate_built":
            built.setdefault(record["iteration"], {})[record["branch"]] = record["prunable"]
    steps = [b for b in built.values() if "depth" in b and len(b) > 1]
    assert steps and any("width-fluctuation" in b for b in built.values())  # the heuristic's two sizings
    for step in steps:  # every candidate within a few MLP channels (3 * hidden each) of the depth one
        for branch, prunable in step.items():
            assert abs(step["depth"] - prunable) <= 0.02 * step["depth"], (branch, step)


def test_depth_never_passes_the_target():
    layers = sizes(100, 30, 80, 100)
    assert size_depth(DepthProposal(layers=[1, 2]), layers, budget=100, limit=90) == [1]
    assert size_depth(DepthProposal(layers=[2]), layers, budget=100, limit=70) == []


def test_without_alternative_sizings_a_step_has_one_width_candidate(tmp_path):
    start_run(tiny_run_options(tmp_path, recovery="none", target_sparsity=0.15, alternative_sizings=[],
                               final_eval={"windows": 0, "speed": False}))
    trace = read_trace(tmp_path / "run" / "trace.jsonl")
    branches = {r["branch"] for r in trace if r["event"] == "candidate_built"}
    assert "width" in branches and not any(b.startswith("width-") for b in branches)
