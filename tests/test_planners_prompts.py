"""Prompt rendering, tolerant reply reading, validation and the skeleton slots (no model, no server)."""

from __future__ import annotations

import json

import pytest

from agent_prune.agent.planners.base import FailedStep
from agent_prune.agent.planners.budget import open_branches
from agent_prune.agent.planners.examples import example_context
from agent_prune.agent.planners.prompting import (
    PROMPT_DIR,
    branches_line,
    profile_table,
    propose_messages,
    reflect_messages,
    repair_message,
)
from agent_prune.agent.planners.replies import (
    ProposalReply,
    ReflectionReply,
    ReplyProblem,
    first_json_object,
    parse_proposal,
    split_reasoning,
)
from agent_prune.agent.planners.slots import Slot, context_schema, skeleton
from agent_prune.agent.proposal import Proposal


def test_prompt_files_exist():
    assert {p.stem for p in PROMPT_DIR.glob("*.md")} >= {"system", "propose", "reflect", "repair"}


def test_profile_table_has_one_line_per_layer():
    context = example_context(num_layers=30)
    lines = profile_table(context).splitlines()
    assert lines[0].split() == ["layer", "src", "params", "heads/kv/mlp", "cut", "BI", "AD", "W", "W10", "G",
                                "T"]
    assert len(lines) == 31
    first = lines[1].split()
    assert first[:5] == ["0", "0", "3.54", "9/3/1536", "0"] and first[-1] == "P"
    assert not lines[2].endswith("P")
    assert all(len(cell.split(".")[-1]) == 1 for cell in first[5:-1])  # z to one decimal
    assert "-0.0" not in profile_table(context)


def test_propose_prompt_holds_everything_the_planner_needs():
    context = example_context(num_layers=30)
    system, user = propose_messages(context)
    assert system["role"] == "system" and "JSON" in system["content"]
    text = user["content"]
    assert "$" not in text
    for needle in ("Step 3.", "30 layers", "6.7%", "25.0%", "3,538,944", "BI=block_influence",
                   "removed layer 20", "early layers are fragile", "Do not remove again: 3",
                   "Allowed branches: depth, width", '"mlp_share"'):
        assert needle in text, needle
    assert len(system["content"]) + len(text) < 6000  # measured in tokens by bench/planner_prompts.py


def test_reflect_and_repair_prompts():
    context = example_context(num_layers=12)
    failed = FailedStep(iteration=4, proposal=Proposal(rationale="r", depth={"layers": [5]}),
                        outcome="depth: perplexity +41% (gate 30%)",
                        candidates=[{"branch": "depth", "metrics": {"perplexity": 40.1}}])
    text = reflect_messages(context, failed)[1]["content"]
    assert "Step 4 was rolled back" in text and '"depth": {"layers": [5]}' in text
    assert "+41%" in text and '"perplexity": 40.1' in text and "$" not in text
    repair = repair_message(["depth.layers [40] do not exist (valid: 0..11)"])
    assert repair["role"] == "user" and "- depth.layers [40] do not exist" in repair["content"]


@pytest.mark.parametrize("text", [
    '{"a": 1}',
    'Sure, here: {"a": 1} hope it helps {"b": 2}',
    '```json\n{"a": 1}\n```',
    'noise {not json} then {"a": 1}',
])
def test_first_json_object(text):
    assert first_json_object(text) == {"a": 1}


@pytest.mark.parametrize("text", ["", "   ", "no json here", '{"a": 1', "[1, 2]"])
def test_first_json_object_problems(text):
    with pytest.raises(ReplyProblem):
        first_json_object(text)


def test_reasoning_blocks_are_split_off():
    answer, thoughts = split_reasoning('<think>layer 9 is flat</think>\n{"a": 1}')
    assert answer == '{"a": 1}' and thoughts == "layer 9 is flat"
    assert split_reasoning('{"a": 1}') == ('{"a": 1}', None)


def test_parse_proposal_reports_schema_and_context_problems():
    context = example_context(num_layers=12)
    with pytest.raises(ReplyProblem) as info:
        parse_proposal({"rationale": "x", "depth": {"layers": ["nine"]}}, context)
    assert info.value.problems[0].startswith("depth.layers.0:")
    with pytest.raises(ReplyProblem) as info:
        parse_proposal({"rationale": "x", "depth": {"layers": [0, 3, 12]}}, context)
    text = "; ".join(info.value.problems)
    assert "[12] do not exist" in text and "[0] are protected" in text and "[3] were just rolled back" in text
    assert parse_proposal({"rationale": "x", "width": {"layers": []}}, context).width.mlp_share == 1.0


def test_a_layer_named_twice_counts_once():
    """Small planner models loop on a number; a repeat means the layer once (its shares summed)."""
    context = example_context(num_layers=12)
    reply = {"rationale": "x", "depth": {"layers": [9, 9]},
             "width": {"layers": [4, 5, 4, 6, 6, 6], "mlp_share": 1.0}}
    proposal = parse_proposal(reply, context)
    assert proposal.depth.layers == [9] and proposal.width.layers == [4, 5, 6]
    assert proposal.width.mlp_shares is None
    shares = {"layers": [4, 5, 4, 6], "mlp_share": 1.0, "mlp_shares": [1.0, 2.0, 0.5, 1.0]}
    width = parse_proposal({"rationale": "x", "width": shares}, context).width
    assert width.layers == [4, 5, 6] and width.mlp_shares == [1.5, 2.0, 1.0]
    # Too few layers once the repeats are merged is still refused, with the budget's reason.
    with pytest.raises(ReplyProblem, match=r"width.layers \[5\] can give only"):
        parse_proposal({"rationale": "x", "width": {"layers": [5, 5, 5], "mlp_share": 1.0}}, context)
    # A share list that does not match the layers as written is refused as written.
    mismatch = {"layers": [4, 4, 5], "mlp_share": 1.0, "mlp_shares": [1.0, 1.0]}
    with pytest.raises(ReplyProblem, match=r"mlp_shares has 2 entries; give one per entry of width\.layers"):
        parse_proposal({"rationale": "x", "width": mismatch}, context)


def test_wire_schema_is_strict_friendly():
    """OpenAI strict mode wants every property required and no defaults."""
    for model in (ProposalReply, ReflectionReply):
        schema = json.dumps(model.model_json_schema())
        assert '"default"' not in schema


def test_int_slot_accepts_only_existing_unique_layers_within_size():
    slot = Slot("ints", frozenset(range(1, 29)), min_items=1, max_items=2)
    accepted = ["", "1", "12", "12,", "12, 5", "12]", "12, 5]"]
    rejected = ["0", "29", "12, 12", "12, 5,", "]", "1 2", "x", "\n", "12,   ", "  "]
    assert all(slot.accepts(t) for t in accepted)
    assert not any(slot.accepts(t) for t in rejected)
    assert slot.value("12, 5]") == "12, 5" and slot.finished("12, 5]")
    assert Slot("ints", frozenset(range(4)), 0, 4).accepts("]")  # an empty list may be fine


def test_share_and_text_slots():
    share = Slot("share")
    assert all(share.accepts(t) for t in ("0", "0.", "0.25", "1", "1.0", "0.5}", "1,"))
    assert not any(share.accepts(t) for t in ("2", "1.5", "0.555", "}", "-"))
    assert share.value("0.5}") == "0.5" and share.value("1.}") == "1"
    text = Slot("text")
    assert text.accepts('Layer 9 is "flat') and not text.accepts("line\nbreak")
    assert text.value('say \\ "quoted" more') == "say \\\\"


def test_skeleton_follows_branches_and_removable_layers():
    context = example_context(num_layers=12)
    parts = skeleton(ProposalReply, context)
    depth = next(p for p in parts if isinstance(p, Slot) and p.min_items == 1)
    assert 0 not in depth.allowed and 3 not in depth.allowed and 11 in depth.allowed
    assert depth.max_items == 2  # twice the layers the step budget allows
    width = next(p for p in parts if isinstance(p, Slot) and p.allow_empty)
    assert width.min_items == 3 and width.accepts("]") and not width.accepts("4, 5]")
    assert width.accepts("4, 5, 6]")
    filled = "".join(p if isinstance(p, str) else {"text": "t", "ints": "5", "share": "1"}[p.kind]
                     if p is not width else "" for p in parts)
    assert parse_proposal(json.loads(filled), context).depth.layers == [5]
    width_only = context.model_copy(update={"branches": ["width"]})
    assert '"depth": null' in "".join(p for p in skeleton(ProposalReply, width_only) if isinstance(p, str))


def test_proposals_must_fit_the_step_budget():
    context = example_context(num_layers=12)  # budget: one layer's parameters
    with pytest.raises(ReplyProblem, match=r"width.layers \[5\] can give only 1,327,104 of the 3,538,944"):
        parse_proposal({"rationale": "x", "width": {"layers": [5], "mlp_share": 1.0}}, context)
    assert parse_proposal({"rationale": "x", "width": {"layers": [4, 5, 6], "mlp_share": 1.0}}, context)
    small = context.model_copy(update={"step_budget_params": 1_000_000})
    assert open_branches(small) == ["width"] and "depth is not possible" in branches_line(small)
    with pytest.raises(ReplyProblem, match="depth is not possible this step"):
        parse_proposal({"rationale": "x", "depth": {"layers": [5]}}, small)
    assert '"depth": null' in "".join(p for p in skeleton(ProposalReply, small) if isinstance(p, str))
    assert "at least 3 layers to thin" in propose_messages(context)[1]["content"]


def test_context_schema_carries_the_same_limits():
    context = example_context(num_layers=12)
    schema = context_schema(ProposalReply, context)["properties"]
    assert schema["depth"]["properties"]["layers"]["items"]["enum"] == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    width = schema["width"]["properties"]
    assert width["layers"]["anyOf"][1]["minItems"] == 3 and width["mlp_share"]["enum"][-1] == 1.0
    small = context.model_copy(update={"step_budget_params": 1_000_000})
    assert context_schema(ProposalReply, small)["properties"]["depth"] == {"type": "null"}
    lesson = context_schema(ReflectionReply, context)["properties"]
    assert lesson["avoid_layers"]["items"]["enum"] == list(range(12))


def test_depth_never_takes_more_than_is_left_to_the_target():
    from agent_prune.agent.planners.budget import removable_layers
    from agent_prune.agent.planners.heuristic import heuristic_proposal

    context = example_context(num_layers=12)  # every layer 3,538,944 parameters; budget one layer
    last_step = context.model_copy(update={"remaining_params": 2_000_000})
    assert open_branches(last_step) == ["width"] and heuristic_proposal(last_step).depth is None
    with pytest.raises(ReplyProblem, match="or has more than 2,000,000 parameters"):
        parse_proposal({"rationale": "x", "depth": {"layers": [5]}}, last_step)
    rows = [r.model_copy(update={"params": 1_500_000}) if r.index == 7 else r for r in last_step.layers]
    thinned = last_step.model_copy(update={"layers": rows})  # a layer earlier steps thinned fits
    assert removable_layers(thinned) == [7] and heuristic_proposal(thinned).depth.layers == [7]
    assert parse_proposal({"rationale": "x", "depth": {"layers": [7, 5]}}, thinned).depth.layers == [7, 5]
    with pytest.raises(ReplyProblem, match=r"starts with layer 5 .* more than the 2,000,000 this step may"):
        parse_proposal({"rationale": "x", "depth": {"layers": [5, 7]}}, thinned)


def test_the_heuristic_rests_depth_after_two_decisive_losses_and_tries_it_again_later():
    from agent_prune.agent.planners.heuristic import heuristic_proposal
    from agent_prune.agent.planners.prompting import history_lines
    from agent_prune.agent.proposal import StepRecord

    def step(iteration: int, rival_z: float | None, branch: str = "width") -> StepRecord:
        rival = None if rival_z is None else ("width" if branch == "depth" else "depth")
        return StepRecord(iteration=iteration, branch=branch, summary="s", sparsity=0.03 * iteration,
                          perplexity=25.0, rival=rival, rival_z=rival_z)

    def at(iteration: int, *history: StepRecord):
        context = example_context(num_layers=12, history=0)
        update = {"iteration": iteration, "history": list(history)}
        return heuristic_proposal(context.model_copy(update=update))

    lost_twice = (step(1, 5.9), step(2, 8.0))
    rested = at(3, *lost_twice)
    assert rested.depth is None and rested.width is not None
    assert "lost its last 2 tries (z +5.9, z +8.0)" in rested.rationale
    assert at(4, *lost_twice, step(3, None)).depth is None
    assert at(5, *lost_twice, step(3, None), step(4, None)).depth is not None  # three iterations on
    assert at(3, step(1, 5.9), step(2, 1.5)).depth is not None  # one loss inside the noise
    assert at(3, step(1, 5.9, branch="depth"), step(2, 8.0)).depth is not None  # depth won a step
    assert at(2, step(1, 9.0)).depth is not None  # one try is not enough
    # with two width candidates the closest rival is the other width; depth's loss is in the leads
    beside = [StepRecord(iteration=i, branch="width-fluctuation", summary="s", sparsity=0.03 * i,
                         perplexity=25.0, rival="width", rival_z=1.2, leads={"width": 1.2, "depth": z})
              for i, z in ((1, 6.1), (2, 7.4))]
    assert "lost its last 2 tries (z +6.1, z +7.4)" in at(3, *beside).rationale
    assert "paired lead over the depth candidate z +6.1, over the width candidate z +1.2" in history_lines(
        example_context(history=0).model_copy(update={"history": beside}))
    assert "paired lead over the depth candidate z +8.0" in history_lines(
        example_context(history=0).model_copy(update={"history": list(lost_twice)}))
