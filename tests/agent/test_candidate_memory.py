"""Candidates are scored from their replay and not kept in memory: the scores, and so the decisions,
are those of the models that were built."""

import pytest
import torch

from agent_prune.agent.profiling import profile_state
from agent_prune.agent.runtime import RunContext
from agent_prune.agent.states import ModelStates, save_state
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options

ACTIONS = {
    "depth": [{"kind": "remove_layers", "layers": [2]}],
    "width": [{"kind": "prune_width", "layer": i, "mlp_channels": 24, "kv_groups": 0} for i in range(6)],
}


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


@pytest.mark.parametrize("recovery", ["none", "reconstruct"])
def test_a_replayed_candidate_scores_exactly_as_the_built_one(tmp_path, recovery):
    ctx = RunContext(tiny_run_options(tmp_path, recovery=recovery))
    ctx.steps.commit_dense()
    model, manifest = ctx.states.load(ctx.states.store.step_dir(0))
    profile = profile_state(ctx, model, manifest)
    for branch, actions in ACTIONS.items():
        built, built_manifest, info = ctx.builder.candidate(model, manifest, actions, profile)
        target = tmp_path / "candidates" / branch
        save_state(target, built, built_manifest, {"actions": actions, **info})
        replayed, _ = ctx.states.replay(target)
        assert replayed is not built
        assert without_timing(ctx.scoring.score(replayed)) == without_timing(ctx.scoring.score(built))


@pytest.mark.parametrize("recovery", ["none", "reconstruct"])
def test_a_fluctuation_candidate_carries_biases_and_replays_bit_for_bit(tmp_path, recovery):
    """The fluctuation pruner keeps the removed channels' and heads' mean output as o_proj/down_proj
    biases, which the dense base lacks; the saved candidate replays to the same weights and scores."""
    ctx = RunContext(tiny_run_options(tmp_path, recovery=recovery))
    ctx.steps.commit_dense()
    model, manifest = ctx.states.load(ctx.states.store.step_dir(0))
    profile = profile_state(ctx, model, manifest)
    actions = [{**ACTIONS["width"][0], "kv_groups": 1}, *ACTIONS["width"][1:]]
    built, built_manifest, info = ctx.builder.candidate(model, manifest, actions, profile, "fluctuation")
    assert info["pruner"] == "fluctuation" and info["bias_compensation"] == {"modules": 7}
    layers = built.model.layers
    assert layers[0].self_attn.o_proj.bias is not None
    assert all(layer.mlp.down_proj.bias is not None for layer in layers)
    assert all(layer.mlp.down_proj.bias is None for layer in ctx.base.model.model.layers)
    target = tmp_path / "candidates" / "fluctuation"
    save_state(target, built, built_manifest, {"actions": actions, **info})
    replayed, _ = ctx.states.replay(target)
    built_state, replayed_state = built.state_dict(), replayed.state_dict()
    assert built_state.keys() == replayed_state.keys()
    assert all(torch.equal(built_state[key], replayed_state[key]) for key in built_state)
    assert without_timing(ctx.scoring.score(replayed)) == without_timing(ctx.scoring.score(built))


def test_a_run_keeps_one_replayed_state_and_no_candidate(tmp_path):
    ctx = RunContext(tiny_run_options(tmp_path, final_eval={"windows": 0, "speed": False}))
    from agent_prune.agent.graph import run_graph

    state = run_graph(ctx)
    assert state["status"] == "target_reached"
    assert len(ctx.states._models) <= ModelStates.MODEL_CACHE == 1
    assert all("candidates" not in key for key in ctx.states._models)
    assert any(r["event"] == "decision" for r in read_trace(tmp_path / "run" / "trace.jsonl"))



def test_building_a_candidate_cuts_the_current_step_in_place_out_of_the_cache(tmp_path, monkeypatch):
    """The current step's model must not sit beside its own copy, nor in the state cache beside the
    dense model and the candidate during the refit: the build takes it out of the cache and cuts it
    in place. The candidate built this way equals the one built from a copy, bit for bit, and the
    dense model is untouched."""
    ctx = RunContext(tiny_run_options(tmp_path))
    ctx.steps.commit_dense()
    current = ctx.states.store.step_dir(0)
    model, manifest = ctx.states.load(current)
    profile = profile_state(ctx, model, manifest)
    held, _, held_info = ctx.builder.candidate(model, manifest, ACTIONS["width"], profile)
    dense_before = {k: v.clone() for k, v in ctx.base.model.state_dict().items()}
    cached_at_refit, refitted = [], []
    recover = ctx.builder.recover

    def spy(candidate, *args, **kwargs):
        cached_at_refit.append(len(ctx.states._models))
        refitted.append(candidate)
        return recover(candidate, *args, **kwargs)

    monkeypatch.setattr(ctx.builder, "recover", spy)
    target = tmp_path / "candidates" / "width"
    info = ctx.builder.build(ctx.states, current, ACTIONS["width"], profile, target)
    assert cached_at_refit == [0]
    assert refitted[0] is model  # the step's own model, cut in place: no copy beside it
    del model
    refitted.clear()
    assert all(torch.equal(v, dense_before[k]) for k, v in ctx.base.model.state_dict().items())
    assert without_timing(info["recovery"]) == without_timing(held_info["recovery"])
    built, _ = ctx.states.replay(target)
    held_state, built_state = held.state_dict(), built.state_dict()
    assert all(torch.equal(held_state[key], built_state[key]) for key in held_state)
