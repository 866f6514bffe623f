"""The planner interface: a context in, a validated proposal (or reflection) out, with a record.

A planner never raises for what an LLM says or for a network failure: it returns a result whose
``attempts`` say what happened (prompt, raw reply, error) and whose ``fallback`` names the planner
that finally produced the proposal when the first one could not. The loop writes all of it into
the trace.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field

from agent_prune.agent.proposal import PlannerContext, Proposal, Reflection


class Attempt(BaseModel):
    """One exchange with a planner: what was asked, what came back, and what was wrong with it."""

    prompt: list[dict] = Field(default_factory=list)  # chat messages
    raw_reply: str | None = None
    reasoning: str | None = None
    error: str | None = None
    duration_s: float = 0.0
    mode: str | None = None  # how the reply was obtained: json_schema, json_text, constrained, skeleton


class PlannerResult(BaseModel):
    planner: str
    proposal: Proposal
    attempts: list[Attempt] = Field(default_factory=list)
    status: str = "valid"  # "valid" | "repaired" | "fallback"
    fallback: str | None = None  # name of the planner that produced the proposal after a failure
    fallback_reason: str | None = None  # one line: why the first planner's answer was not used


class ReflectionResult(BaseModel):
    planner: str
    reflection: Reflection
    attempts: list[Attempt] = Field(default_factory=list)
    status: str = "valid"  # "valid" | "repaired" | "fallback"
    fallback: str | None = None
    fallback_reason: str | None = None


class FailedStep(BaseModel):
    """What the loop tells a planner about a rejected step, so it can reflect."""

    iteration: int
    proposal: Proposal
    outcome: str  # e.g. "depth candidate: perplexity +41% (gate 30%)"
    candidates: list[dict] = Field(default_factory=list)


class Planner(Protocol):
    name: str

    def propose(self, context: PlannerContext) -> PlannerResult: ...

    def reflect(self, context: PlannerContext, failed: FailedStep) -> ReflectionResult: ...
