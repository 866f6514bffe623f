"""The --planner spec and options: one syntax, clear errors, no torch for the LLM-free planners."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent_prune.agent.planners.heuristic import HeuristicPlanner
from agent_prune.agent.planners.llm import LLMPlanner
from agent_prune.agent.planners.openai_chat import normalise_base_url
from agent_prune.agent.planners.spec import PlannerSpec, make_planner, parse_planner_spec
from agent_prune.agent.resources import planner_settings
from agent_prune.commands.run import parse_key_values
from agent_prune.errors import InputError
from tests.conftest import SHARED_GGUF


@pytest.mark.parametrize(("spec", "expected"), [
    ("heuristic", PlannerSpec("heuristic")),
    ("openai:gpt-4o-mini", PlannerSpec("openai", "gpt-4o-mini")),
    ("openai:qwen2.5:7b@http://localhost:11434/v1", PlannerSpec("openai", "qwen2.5:7b",
                                                                "http://localhost:11434/v1")),
    ("openai:org/model-7B@https://host:8000/v1", PlannerSpec("openai", "org/model-7B", "https://host:8000/v1")),
    ("hf:../shared/models/x.gguf", PlannerSpec("hf", "../shared/models/x.gguf")),
])
def test_specs_parse(spec, expected):
    assert parse_planner_spec(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("gpt-4o", "unknown planner"),
    ("", "unknown planner"),
    ("openai:", "malformed planner spec"),
    ("openai:m@localhost:8000", "malformed planner spec"),
    ("hf:", "malformed planner spec"),
])
def test_bad_specs_are_input_errors(spec, message):
    with pytest.raises(InputError, match=message):
        parse_planner_spec(spec)


def test_make_planner_kinds_and_options(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-abcdefgh")
    assert isinstance(make_planner("heuristic"), HeuristicPlanner)
    hosted = make_planner("openai:gpt-4o-mini", max_repairs=1)
    assert isinstance(hosted, LLMPlanner) and hosted.max_repairs == 1
    assert hosted.describe()["base_url"] == "https://api.openai.com/v1"
    assert "max_completion_tokens" in hosted.describe()  # newer OpenAI models refuse max_tokens
    local = make_planner("openai:llama3", base_url="http://127.0.0.1:11434")
    assert local.describe()["base_url"] == "http://127.0.0.1:11434/v1"
    assert "max_tokens" in local.describe()
    with pytest.raises(InputError, match="bad planner option max_repairs"):
        make_planner("heuristic", max_repairs=-1)
    with pytest.raises(InputError, match="bad planner option colour"):
        make_planner("heuristic", colour="red")
    with pytest.raises(InputError, match="two planner URLs"):
        make_planner("openai:m@http://a:1/v1", base_url="http://b:2/v1")
    with pytest.raises(InputError, match="unknown structured-output mode"):
        make_planner("openai:m@http://a:1/v1", structured="xml")


def test_hf_planner_checks_its_path_without_loading():
    with pytest.raises(InputError, match="does not exist"):
        make_planner("hf:/nonexistent/model.gguf")
    if SHARED_GGUF.is_file():
        planner = make_planner(f"hf:{SHARED_GGUF}", decoding="skeleton")
        assert planner.backend._loaded is None and planner.describe()["decoding"] == "skeleton"


def test_urls_are_normalised():
    assert normalise_base_url("http://h:1") == "http://h:1/v1"
    assert normalise_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(InputError, match="not an http"):
        normalise_base_url("ftp://h/v1")


def test_cli_planner_options_and_run_settings():
    from agent_prune.agent.options import RunOptions

    parsed = parse_key_values(["max_repairs=1", "api_key_env=VLLM_KEY", "temperature=0.5"])
    assert parsed == {"max_repairs": 1, "api_key_env": "VLLM_KEY", "temperature": 0.5}
    with pytest.raises(InputError, match="not KEY=VALUE"):
        parse_key_values(["max_repairs"])
    options = RunOptions(model="m", out="o", target_sparsity=0.2, planner_base_url="http://h:1/v1",
                         planner_options=parsed)
    assert planner_settings(options) == {**parsed, "timeout_s": 120.0, "base_url": "http://h:1/v1"}
    with pytest.raises(InputError, match="has its own setting"):
        planner_settings(options.model_copy(update={"planner_options": {"base_url": "x"}}))


def test_llm_planners_do_not_import_torch():
    code = ("import sys, agent_prune.agent.planners.spec as s, agent_prune.agent.planners.openai_chat, "
            "agent_prune.agent.planners.slots; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
