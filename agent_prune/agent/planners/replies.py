"""Turn whatever a planner LLM said into a validated :class:`Proposal` / :class:`Reflection`, or into
a list of problems that can be sent back to it.

Two shapes of each reply exist: the *wire* models (``ProposalReply``, ``ReflectionReply``), sent to
servers as the structured-output schema, where every field is required (OpenAI's strict mode wants
that and rejects ``default``), and the lenient domain models, used to read free-form replies.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_prune.agent.planners.budget import budget_problems
from agent_prune.agent.proposal import (
    PlannerContext,
    Proposal,
    Reflection,
    validate_proposal,
    validate_reflection,
)

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


class DepthReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(description="layers to remove, most expendable first")


class WidthReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(description="layers to thin; empty for all")
    mlp_share: float = Field(ge=0.0, le=1.0, description="share of the cut taken from MLP channels")


class ProposalReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rationale: str = Field(description="why, in one or two sentences")
    depth: DepthReply | None
    width: WidthReply | None


class ReflectionReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lesson: str = Field(description="what went wrong and what to try instead")
    avoid_layers: list[int]


class ReplyProblem(Exception):
    """A reply that cannot be used; ``problems`` are phrased for the LLM to fix."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def split_reasoning(text: str) -> tuple[str, str | None]:
    """Separate ``<think>...</think>`` blocks (reasoning models) from the answer."""
    thoughts = [m.strip() for m in _THINK.findall(text)]
    answer = _THINK.sub("", text).strip()
    return answer, "\n".join(t for t in thoughts if t) or None


def first_json_object(text: str) -> dict:
    """The first complete JSON object in ``text`` (inside a code fence or prose), else ReplyProblem."""
    if not text or not text.strip():
        raise ReplyProblem(["the reply was empty; answer with one JSON object"])
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start in (i for i, ch in enumerate(candidate) if ch == "{"):
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ReplyProblem(["the reply holds no complete JSON object; answer with one JSON object only"])


def parse_proposal(data: dict, context: PlannerContext) -> Proposal:
    try:
        proposal = Proposal.model_validate(data)
    except ValidationError as exc:
        raise ReplyProblem(schema_problems(exc)) from None
    problems = validate_proposal(proposal, context) or budget_problems(proposal, context)
    if problems:
        raise ReplyProblem(problems)
    return proposal


def parse_reflection(data: dict, context: PlannerContext) -> Reflection:
    try:
        reflection = Reflection.model_validate(data)
    except ValidationError as exc:
        raise ReplyProblem(schema_problems(exc)) from None
    problems = validate_reflection(reflection, context)
    if problems:
        raise ReplyProblem(problems)
    return reflection


def schema_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors, one short line each, with the JSON path of the offending field."""
    lines = []
    for error in exc.errors()[:6]:
        where = ".".join(str(p) for p in error["loc"]) or "reply"
        lines.append(f"{where}: {error['msg']}")
    return lines
