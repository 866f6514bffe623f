"""The in-process planner on the real shared model (SmolLM2-135M-Instruct) for a 30-layer context."""

from __future__ import annotations

import pytest

from agent_prune.agent.planners.examples import example_context
from agent_prune.agent.planners.replies import parse_proposal
from agent_prune.agent.planners.spec import make_planner
from tests.conftest import SHARED_GGUF, require_shared

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("decoding", ["skeleton", "constrained"])
def test_hf_planner_proposes_a_validated_step(decoding):
    require_shared()
    if decoding == "constrained":
        pytest.importorskip("outlines")
    notes: list[str] = []
    planner = make_planner(f"hf:{SHARED_GGUF}", notify=notes.append, decoding=decoding)
    context = example_context(num_layers=30)
    result = planner.propose(context)
    # The decoders keep every value inside what the context allows, so no repair should be needed.
    assert result.status == "valid", [a.error for a in result.attempts]
    (attempt,) = result.attempts
    assert attempt.mode == decoding and attempt.prompt[0]["role"] == "system" and attempt.raw_reply
    assert parse_proposal(result.proposal.model_dump(), context) == result.proposal
    assert attempt.reasoning == result.proposal.rationale and not notes
