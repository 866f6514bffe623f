import json

import torch

from agent_prune.actions import replay
from agent_prune.actions.manifest import parse_manifest
from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from agent_prune.checkpoints.store import read_state_dir
from agent_prune.models.loading import load_model
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
    # each accepted step reaches later planners with the rival it beat and by how much
    decided = {r["iteration"]: r for r in records if r["event"] == "decision" and r["accepted"]}
    later = [r for r in records if r["event"] == "plan" and r["context"]["history"]]
    assert later, "the tiny run takes more than one step"
    for plan in later:
        for step in plan["context"]["history"]:
            decision = decided[step["iteration"]]
            comparisons = decision["comparisons"]
            assert (step["rival"] is None) == (not comparisons), step
            assert step["leads"] == decision["leads"]
            assert step["rival_z"] == min(step["leads"].values(), default=None)
            for c in comparisons:  # the knockout's matches of the kept candidate, on the selection signal
                if c["metric"] == "perplexity" and step["branch"] in (c["a"], c["b"]):
                    other = c["b"] if c["a"] == step["branch"] else c["a"]
                    assert abs(step["leads"][other]) == round(abs(c["z"]), 2)
    assert (run / "model" / "config.json").is_file()
    assert (run / "report.md").is_file()
    saved = json.loads((run / "summary.json").read_text())
    assert saved["accepted_steps"] == summary["accepted_steps"] >= 1
    assert_profiles_follow_the_builds(records)


def assert_profiles_follow_the_builds(records):
    """A step's profile is the one its build measured in the refit walk exactly when that build
    measured one (not a depth cut without refit); no build of the last iteration measures."""
    built = {(r["iteration"], r["branch"]): r for r in records if r["event"] == "candidate_built"}
    accepted = {r["step"]: r for r in records if r["event"] == "decision" and r["accepted"]}
    last = max(iteration for iteration, _ in built)
    for (iteration, _), record in built.items():
        assert not (iteration == last and record["profile_measured"]), record
    for profile in (r for r in records if r["event"] == "profile" and r["step"] > 0):
        decision = accepted[profile["step"]]
        walked = built[(decision["iteration"], decision["branch"])]["profile_measured"]
        assert profile["measured_in"] == ("reconstruction" if walked else "profile"), profile


def test_distill_heals_each_accepted_step_and_exports_what_it_healed(tmp_path):
    options = tiny_run_options(tmp_path, recovery="distill", heal_tokens=512, heal_seconds=30,
                               final_eval={"windows": 0, "speed": False})
    summary = start_run(options)
    assert summary["status"] == "target_reached", summary
    run = tmp_path / "run"
    records = read_trace(run / "trace.jsonl")
    built = [r for r in records if r["event"] == "candidate_built"]
    assert built and all(r["recovery"] is None for r in built)  # candidates are not reconstructed
    heals = [r for r in records if r["event"] == "heal"]
    assert len(heals) == summary["accepted_steps"] and all(h["metrics"]["perplexity"] for h in heals)
    steps = sorted((run / "checkpoints").glob("step-*"))[1:]
    assert steps
    for step in steps:
        heal = json.loads((step / "record.json").read_text())["heal"]
        assert heal["method"] == "distill" and heal["tokens"] > 0
    manifest, tensors, _ = read_state_dir(steps[-1])
    assert tensors, "healed weights must travel with the step"
    exported = load_model(str(run / "model")).model.state_dict()
    parsed = parse_manifest(json.dumps(manifest))
    assert parsed.overridden
    healed = replay(load_model(options.model).model, parsed, tensors)
    cut_only = replay(load_model(options.model).model, parsed.model_copy(update={"overridden": []}), {})
    assert all(torch.equal(exported[k], v) for k, v in healed.state_dict().items())
    assert any(not torch.equal(exported[k], v) for k, v in cut_only.state_dict().items())
