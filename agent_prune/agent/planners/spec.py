"""The ``--planner`` spec: one syntax for the CLI, config files and the Python API.

    heuristic               the deterministic planner (no LLM)
    openai:MODEL            hosted OpenAI; key from $OPENAI_API_KEY
    openai:MODEL@URL        any OpenAI-compatible server (Ollama, vLLM, llama.cpp, LM Studio);
                            key optional, from $AGENT_PRUNE_PLANNER_API_KEY (or api_key_env)
    hf:PATH_OR_ID           an in-process transformers chat model (folder or .gguf file)

Options (``PlannerOptions``) are the same keys everywhere: ``--planner-base-url`` is
``base_url``, ``--planner-timeout`` is ``timeout_s``, and so on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_prune.agent.planners.base import Planner
from agent_prune.agent.planners.heuristic import HeuristicPlanner
from agent_prune.agent.planners.llm import LLMPlanner, Notify
from agent_prune.errors import InputError

SPEC_HELP = "use heuristic, openai:MODEL, openai:MODEL@URL or hf:PATH"
_OPENAI = re.compile(r"^openai:(?P<model>[^@\s]+?)(?:@(?P<url>https?://\S+))?$")


class PlannerOptions(BaseModel):
    """Planner settings shared by the CLI flags, the config file and the Python API."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)  # transport retries (429, 5xx, timeout) per request
    max_repairs: int = Field(2, ge=0, le=5)  # invalid replies answered with the problems
    backoff_s: float = Field(1.0, ge=0)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, gt=0)
    seed: int | None = None
    structured: str = "auto"  # openai: auto | json_schema | json_object | json_text
    decoding: str = "skeleton"  # hf: skeleton | constrained (needs outlines)
    device: str = "cpu"  # hf


@dataclass(frozen=True)
class PlannerSpec:
    kind: str  # "heuristic" | "openai" | "hf"
    model: str | None = None
    base_url: str | None = None


def parse_planner_spec(spec: str) -> PlannerSpec:
    spec = (spec or "").strip()
    if spec == "heuristic":
        return PlannerSpec("heuristic")
    if spec.startswith("openai:"):
        match = _OPENAI.match(spec)
        if not match:
            raise InputError(f"malformed planner spec '{spec}'",
                             "use openai:MODEL or openai:MODEL@http://HOST:PORT/v1")
        return PlannerSpec("openai", match["model"], match["url"])
    if spec.startswith("hf:"):
        path = spec[3:].strip()
        if not path:
            raise InputError(f"malformed planner spec '{spec}'", "use hf:PATH_TO_FOLDER_OR_GGUF")
        return PlannerSpec("hf", path)
    raise InputError(f"unknown planner '{spec}'", SPEC_HELP)


def make_planner(spec: str, notify: Notify | None = None, **options) -> Planner:
    """Build the planner named by ``spec``; bad specs or options raise a one-line InputError."""
    parsed = parse_planner_spec(spec)
    try:
        opts = PlannerOptions(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(f"bad planner option {'.'.join(map(str, first['loc']))}: {first['msg']}",
                         "see agent-prune run --help for planner options") from None
    if parsed.kind == "heuristic":
        return HeuristicPlanner()
    if parsed.kind == "openai":
        from agent_prune.agent.planners.openai_chat import OpenAIChat

        if parsed.base_url and opts.base_url and parsed.base_url != opts.base_url:
            raise InputError(f"two planner URLs given ({parsed.base_url} and {opts.base_url})",
                             "pass the URL either in the spec or as --planner-base-url")
        backend = OpenAIChat(parsed.model, base_url=parsed.base_url or opts.base_url,
                             api_key_env=opts.api_key_env, timeout_s=opts.timeout_s,
                             max_retries=opts.max_retries, backoff_s=opts.backoff_s,
                             temperature=opts.temperature, max_tokens=opts.max_tokens, seed=opts.seed,
                             structured=opts.structured, notify=notify)
    else:
        from agent_prune.agent.planners.hf_chat import HFChat

        backend = HFChat(parsed.model, device=opts.device, decoding=opts.decoding,
                         temperature=opts.temperature, seed=opts.seed or 0, max_tokens=opts.max_tokens)
    return LLMPlanner(backend.scrub(spec), backend, HeuristicPlanner(), max_repairs=opts.max_repairs,
                      notify=notify)
