"""The OpenAI-compatible planner against a real HTTP server on 127.0.0.1, through the real openai
client: every scripted case ends valid, repaired, or in the heuristic fallback with its reason."""

from __future__ import annotations

import json
import socket
import time

import pytest

from agent_prune.agent.planners.base import FailedStep
from agent_prune.agent.planners.examples import example_context
from agent_prune.agent.planners.heuristic import heuristic_proposal
from agent_prune.agent.planners.spec import make_planner
from agent_prune.agent.proposal import Proposal
from agent_prune.errors import InputError
from tests.chat_server import ChatServer, Reply, completion, error

GOOD = {"rationale": "Layer 9 has the lowest block influence.", "depth": {"layers": [9, 5]},
        "width": {"layers": [], "mlp_share": 0.8}}
KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e"


@pytest.fixture
def context():
    return example_context(num_layers=12)


@pytest.fixture
def server():
    with ChatServer() as srv:
        yield srv


def planner_for(server, notes, **options):
    options = {"timeout_s": 2.0, "backoff_s": 0.01, **options}
    return make_planner(f"openai:test-model@{server.url}", notify=notes.append, **options)


def reply(data) -> Reply:
    return completion(json.dumps(data))


def test_valid_reply_uses_json_schema_and_records_reasoning(server, context):
    server.add(reply(GOOD))
    result = planner_for(server, []).propose(context)
    assert result.status == "valid" and result.fallback is None
    assert result.proposal == Proposal.model_validate(GOOD)
    assert server.requests[0]["response_format"]["type"] == "json_schema"
    assert len(result.attempts) == 1 and result.attempts[0].mode == "json_schema"
    assert "lowest block influence" in result.attempts[0].reasoning
    assert result.attempts[0].prompt[0]["role"] == "system"


def test_invalid_json_is_repaired(server, context):
    server.add(completion('{"rationale": "cut layer 9", "depth": {"layers": [9'), reply(GOOD))
    notes = []
    result = planner_for(server, notes).propose(context)
    assert result.status == "repaired"
    assert "no complete JSON object" in result.attempts[0].error
    repair = server.requests[1]["messages"]
    assert repair[-2]["role"] == "assistant" and repair[-1]["role"] == "user"
    assert "cannot be used" in repair[-1]["content"]
    assert any("asking again" in n for n in notes)


def test_layer_that_does_not_exist_is_repaired(server, context):
    server.add(reply({**GOOD, "depth": {"layers": [40]}}), reply(GOOD))
    result = planner_for(server, []).propose(context)
    assert result.status == "repaired"
    assert "do not exist" in result.attempts[0].error
    assert "[40] do not exist" in server.requests[1]["messages"][-1]["content"]


def test_protected_layer_is_repaired(server, context):
    server.add(reply({**GOOD, "depth": {"layers": [0]}}), reply(GOOD))
    result = planner_for(server, []).propose(context)
    assert result.status == "repaired" and "protected" in result.attempts[0].error


def test_replies_that_stay_invalid_fall_back_to_the_heuristic(server, context):
    server.add(*[reply({"rationale": "x", "depth": {"layers": [99]}, "width": None})] * 3)
    notes = []
    result = planner_for(server, notes, max_repairs=2).propose(context)
    assert result.status == "fallback" and result.fallback == "heuristic"
    assert len(server.requests) == 3
    assert result.fallback_reason.startswith("no valid reply after 2 repair(s)")
    assert result.proposal == heuristic_proposal(context)
    assert any("heuristic planner proposes this step" in n for n in notes)


def test_refusal_falls_back_at_once(server, context):
    server.add(completion(None, refusal="I can't help with that."))
    result = planner_for(server, []).propose(context)
    assert result.status == "fallback" and len(server.requests) == 1
    assert "refused" in result.fallback_reason and "help with that" in result.fallback_reason


def test_server_errors_are_retried_then_fall_back(server, context):
    server.add(*[error(500, "boom")] * 3)
    notes = []
    result = planner_for(server, notes, max_retries=2).propose(context)
    assert result.status == "fallback" and len(server.requests) == 3
    assert "server error (HTTP 500: boom)" in result.fallback_reason
    assert sum("retrying" in n for n in notes) == 2
    assert [a.error is not None for a in result.attempts[:3]] == [True, True, True]


def test_rate_limit_then_success(server, context):
    server.add(error(429, "slow down", headers={"retry-after": "0.05"}), reply(GOOD))
    notes = []
    result = planner_for(server, notes).propose(context)
    assert result.status == "valid" and len(server.requests) == 2
    assert "rate limited (HTTP 429" in result.attempts[0].error
    assert any("retrying in 0.1 s" in n for n in notes)


def test_exhausted_quota_is_not_retried(server, context):
    server.add(error(429, "You exceeded your current quota", code="insufficient_quota"))
    result = planner_for(server, []).propose(context)
    assert result.status == "fallback" and len(server.requests) == 1


def test_reply_that_never_comes_times_out(server, context):
    server.add(Reply(hang=True))
    start = time.monotonic()
    result = planner_for(server, [], timeout_s=0.3, max_retries=0).propose(context)
    assert time.monotonic() - start < 5
    assert result.status == "fallback" and "timeout" in result.fallback_reason


def test_truncated_reply_is_repaired(server, context):
    server.add(completion('{"rationale": "Layer 9 is', finish_reason="length"), reply(GOOD))
    result = planner_for(server, []).propose(context)
    assert result.status == "repaired" and "cut off" in result.attempts[0].error


def test_empty_reply_is_repaired(server, context):
    server.add(completion(""), reply(GOOD))
    result = planner_for(server, []).propose(context)
    assert result.status == "repaired" and "empty" in result.attempts[0].error


def test_server_without_structured_output_gets_plain_requests(server, context):
    def plain_only(request):
        if "response_format" in request:
            return error(400, "response_format is not supported")
        return completion("Sure! Here is my plan:\n```json\n" + json.dumps(GOOD) + "\n```")

    server.add(*[plain_only] * 4)
    notes = []
    planner = planner_for(server, notes)
    first, second = planner.propose(context), planner.propose(context)
    assert first.status == second.status == "valid"
    assert first.attempts[0].mode == "json_text"
    formats = [r.get("response_format", {}).get("type") for r in server.requests]
    assert formats == ["json_schema", "json_object", None, None]
    assert any("rejected response_format json_schema" in n for n in notes)


def test_llama_cpp_python_style_rejection_moves_to_json_object(server, context):
    def json_object_only(request):
        if request.get("response_format", {}).get("type") == "json_schema":
            return error(500, "1 validation error: ('body', 'response_format', 'type') "
                              "Input should be 'text' or 'json_object'")
        schema = request["response_format"]["schema"]  # this context's limits, for a grammar
        depth_layers = schema["properties"]["depth"]["properties"]["layers"]["items"]["enum"]
        assert 0 not in depth_layers and 3 not in depth_layers and 11 in depth_layers
        return reply(GOOD)

    server.add(json_object_only, json_object_only)
    result = planner_for(server, []).propose(context)
    assert result.status == "valid" and result.attempts[0].mode == "json_object"
    assert len(server.requests) == 2


def test_fixed_json_schema_mode_does_not_degrade(server, context):
    server.add(error(400, "response_format json_schema is not supported"))
    result = planner_for(server, [], structured="json_schema").propose(context)
    assert result.status == "fallback" and len(server.requests) == 1
    assert "rejected the request (HTTP 400" in result.fallback_reason


def test_server_ignoring_the_schema_is_read_tolerantly(server, context):
    server.add(completion("<think>9 looks redundant</think>\nPlan: " + json.dumps(GOOD)))
    result = planner_for(server, []).propose(context)
    assert result.status == "valid"
    assert result.attempts[0].reasoning.startswith("9 looks redundant")


def test_reasoning_fields_are_recorded(server, context):
    server.add(completion(json.dumps(GOOD), reasoning_content="compare BI columns"))
    result = planner_for(server, []).propose(context)
    assert "compare BI columns" in result.attempts[0].reasoning


def test_unsupported_sampling_parameter_is_dropped(server, context):
    server.add(error(400, "Unsupported value: 'temperature' does not support 0 with this model."),
               reply(GOOD))
    result = planner_for(server, []).propose(context)
    assert result.status == "valid"
    assert "temperature" in server.requests[0] and "temperature" not in server.requests[1]


def test_connection_refused(context):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notes = []
    planner = make_planner(f"openai:m@http://127.0.0.1:{port}/v1", notify=notes.append, timeout_s=2)
    result = planner.propose(context)
    assert result.status == "fallback" and "connection refused" in result.fallback_reason
    assert any("connection refused" in n for n in notes)


def test_dns_failure(context):
    planner = make_planner("openai:m@http://planner.invalid:8000/v1", notify=[].append, timeout_s=2)
    result = planner.propose(context)
    assert result.status == "fallback" and "cannot resolve host 'planner.invalid'" in result.fallback_reason


def test_api_key_never_leaks(server, context, monkeypatch):
    monkeypatch.setenv("AGENT_PRUNE_PLANNER_API_KEY", KEY)
    server.add(error(401, f"Incorrect API key provided: {KEY}"), completion(f"my key is {KEY}"),
               *[completion(f"my key is {KEY}")] * 3)
    notes = []
    planner = planner_for(server, notes)
    results = [planner.propose(context), planner.propose(context)]
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"  # it was sent, to this server only
    assert "rejected the API key (HTTP 401" in results[0].fallback_reason
    records = json.dumps([r.model_dump() for r in results]) + "\n".join(notes)
    records += json.dumps(planner.describe())
    assert KEY not in records and "***" in records


def test_openai_key_is_not_sent_to_other_servers(server, context, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.add(reply(GOOD))
    planner_for(server, []).propose(context)
    assert KEY not in server.headers[0]["authorization"]


def test_reflection_valid_and_fallback(server, context):
    failed = FailedStep(iteration=3, proposal=Proposal.model_validate(GOOD), outcome="perplexity +45%")
    server.add(reply({"lesson": "Layer 9 matters; try 5.", "avoid_layers": [9]}),
               *[reply({"lesson": "", "avoid_layers": [77]})] * 3)
    planner = planner_for(server, [])
    good, bad = planner.reflect(context, failed), planner.reflect(context, failed)
    assert good.status == "valid" and good.reflection.avoid_layers == [9]
    assert "perplexity +45%" in server.requests[0]["messages"][-1]["content"]
    assert bad.status == "fallback" and bad.fallback == "heuristic"
    assert "avoid_layers [77] do not exist" in bad.fallback_reason


def test_hosted_openai_without_key_is_an_input_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputError, match=r"\$OPENAI_API_KEY is not set"):
        make_planner("openai:gpt-4o-mini")
