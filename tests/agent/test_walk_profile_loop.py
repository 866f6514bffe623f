"""The loop reads each refitted step's profile off its build instead of profiling it again."""

import json
from pathlib import Path

import torch

from agent_prune.agent.building import PROFILE_FILE
from agent_prune.agent.profiling import profile_from_build
from agent_prune.agent.resources import RunResources
from agent_prune.agent.session import start_run
from agent_prune.agent.states import ModelStates
from agent_prune.agent.trace import read_trace
from agent_prune.io import atomic_write_json
from agent_prune.models.adapters import adapter_for
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity import profile_model
from agent_prune.sensitivity.measure import WalkProfile
from agent_prune.sensitivity.schema import SensitivityProfile
from tests.agent.loop_fixtures import tiny_run_options
from tests.agent.test_loop_run import assert_profiles_follow_the_builds
from tests.conftest import tiny_model
from tests.recovery.surgery import cut_mlp
from tests.sensitivity.test_walk_profile import assert_same_profile


def test_width_steps_take_their_next_profile_from_the_refit_walk(tmp_path):
    options = tiny_run_options(tmp_path, recovery="reconstruct", branches=["width"],
                               final_eval={"windows": 0})
    summary = start_run(options)
    assert summary["accepted_steps"] >= 2, summary
    records = read_trace(tmp_path / "run" / "trace.jsonl")
    assert_profiles_follow_the_builds(records)
    later = [r for r in records if r["event"] == "profile" and r["step"] > 0]
    assert later and all(r["measured_in"] == "reconstruction" for r in later), later
    # the profile the walk measured is the profile of the step as the store replays it
    resources = RunResources(options)
    step = later[-1]
    step_dir = tmp_path / "run" / "checkpoints" / f"step-{step['step']:04d}"
    model, manifest = ModelStates(resources).replay(step_dir)
    fresh = profile_model(model, resources.calibration, gradients=False, dataset="c4", seed=options.seed,
                          model_name=options.model, layer_sources=[r.source for r in manifest.layers])
    walked = SensitivityProfile.model_validate(json.loads(Path(step["path"]).read_text()))
    assert_same_profile(walked, fresh)


def test_a_built_profile_is_used_only_for_the_model_it_describes(tmp_path):
    """A step changed after its build (healed, say) is profiled again: the fingerprints differ."""
    dense = tiny_model("llama")
    pruned = cut_mlp(dense, 40)
    calibration = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    walk = WalkProfile(pruned, calibration, list(range(4)))
    reconstruct(pruned, dense, range(4), calibration, measure=walk)
    path = tmp_path / PROFILE_FILE
    assert profile_from_build(pruned, path) is None  # nothing measured yet
    atomic_write_json(path, walk.profile().model_dump(mode="json"))
    assert profile_from_build(pruned, path) == json.loads(path.read_text())
    with torch.no_grad():
        adapter_for(pruned).mlp_projections(adapter_for(pruned).layers()[3])["down_proj"].weight.mul_(1.01)
    assert profile_from_build(pruned, path) is None
