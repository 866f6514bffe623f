"""The LLM planner: ask a chat backend, validate the reply, repair it a bounded number of times,
and fall back to the heuristic planner when the LLM cannot be reached or keeps answering wrong.

A backend (``OpenAIChat``, ``HFChat``) only turns chat messages into a :class:`ChatReply`; this
driver owns the conversation: the propose/reflect prompts, the repair turns ("that reply cannot be
used: ..."), the record of every attempt, and the fallback. It never raises for what an LLM says or
for a network problem, so a planner cannot end a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from agent_prune.agent.planners.base import (
    Attempt,
    FailedStep,
    Planner,
    PlannerResult,
    ReflectionResult,
)
from agent_prune.agent.planners.prompting import propose_messages, reflect_messages, repair_message
from agent_prune.agent.planners.replies import (
    ProposalReply,
    ReflectionReply,
    ReplyProblem,
    first_json_object,
    parse_proposal,
    parse_reflection,
)
from agent_prune.agent.proposal import PlannerContext

logger = logging.getLogger("agent_prune.planners")

Notify = Callable[[str], None]


@dataclass
class ChatReply:
    """What a backend got back for one request (after its own transport retries)."""

    text: str | None = None  # the answer, reasoning blocks removed
    data: dict | None = None  # the JSON object, when the server or decoder already parsed it
    reasoning: str | None = None  # reasoning the server or model gave besides the answer
    problem: str | None = None  # the reply is unusable but asking again may help (empty, truncated)
    failure: str | None = None  # asking again will not help now (unreachable, refused, rejected key)
    mode: str | None = None
    failed_tries: list[Attempt] = field(default_factory=list)  # transport failures before this reply


class ChatBackend(Protocol):
    def chat(self, messages: list[dict], reply_model: type[BaseModel],
             context: PlannerContext) -> ChatReply: ...

    def scrub(self, text: str) -> str: ...

    def describe(self) -> dict: ...


@dataclass
class _Outcome:
    value: object | None
    attempts: list[Attempt]
    status: str = "valid"
    reason: str | None = None


class LLMPlanner:
    """A planner backed by a chat LLM, with bounded repairs and a fallback planner."""

    def __init__(self, name: str, backend: ChatBackend, fallback: Planner, max_repairs: int = 2,
                 notify: Notify | None = None):
        self.name = name
        self.backend = backend
        self.fallback = fallback
        self.max_repairs = max_repairs
        self.notify = notify or logger.warning

    def describe(self) -> dict:
        return {"planner": self.name, "max_repairs": self.max_repairs, **self.backend.describe()}

    def propose(self, context: PlannerContext) -> PlannerResult:
        outcome = self._converse(propose_messages(context), ProposalReply, context,
                                 lambda data: parse_proposal(data, context))
        if outcome.value is not None:
            return PlannerResult(planner=self.name, proposal=outcome.value,
                                 attempts=outcome.attempts, status=outcome.status)
        self._say(f"{outcome.reason}; the {self.fallback.name} planner proposes this step")
        backup = self.fallback.propose(context)
        return PlannerResult(planner=self.name, proposal=backup.proposal,
                             attempts=outcome.attempts + backup.attempts, status="fallback",
                             fallback=self.fallback.name, fallback_reason=outcome.reason)

    def reflect(self, context: PlannerContext, failed: FailedStep) -> ReflectionResult:
        outcome = self._converse(reflect_messages(context, failed), ReflectionReply, context,
                                 lambda data: parse_reflection(data, context))
        if outcome.value is not None:
            return ReflectionResult(planner=self.name, reflection=outcome.value,
                                    attempts=outcome.attempts, status=outcome.status)
        self._say(f"{outcome.reason}; the {self.fallback.name} planner reflects on this step")
        backup = self.fallback.reflect(context, failed)
        return ReflectionResult(planner=self.name, reflection=backup.reflection,
                                attempts=outcome.attempts + backup.attempts, status="fallback",
                                fallback=self.fallback.name, fallback_reason=outcome.reason)

    def _converse(self, messages: list[dict], reply_model: type[BaseModel], context: PlannerContext,
                  parse: Callable[[dict], object]) -> _Outcome:
        attempts: list[Attempt] = []
        for round_ in range(self.max_repairs + 1):
            start = time.monotonic()
            reply = self._ask(messages, reply_model, context)
            attempts.extend(reply.failed_tries)
            attempt = Attempt(prompt=messages, raw_reply=reply.text, reasoning=reply.reasoning,
                              mode=reply.mode, duration_s=round(time.monotonic() - start, 3))
            attempts.append(attempt)
            if reply.failure:
                attempt.error = reply.failure
                return _Outcome(None, attempts, reason=reply.failure)
            try:
                if reply.problem:
                    raise ReplyProblem([reply.problem])
                data = reply.data if reply.data is not None else first_json_object(reply.text or "")
                attempt.reasoning = _join(reply.reasoning, _explanation(data))
                value = parse(data)
            except ReplyProblem as exc:
                attempt.error = "; ".join(exc.problems)
                last = round_ == self.max_repairs
                self._say(f"invalid reply ({attempt.error})" + ("" if last else "; asking again"))
                messages = [*messages, {"role": "assistant", "content": reply.text or ""},
                            repair_message(exc.problems)]
                continue
            return _Outcome(value, attempts, status="valid" if round_ == 0 else "repaired")
        reason = f"no valid reply after {self.max_repairs} repair(s): {attempts[-1].error}"
        return _Outcome(None, attempts, reason=reason)

    def _ask(self, messages: list[dict], reply_model: type[BaseModel],
             context: PlannerContext) -> ChatReply:
        try:
            return self.backend.chat(messages, reply_model, context)
        except Exception as exc:  # a planner must never end the run; the trace keeps the reason
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            return ChatReply(failure=self.backend.scrub(f"unexpected {type(exc).__name__}: {detail}"))

    def _say(self, message: str) -> None:
        self.notify(self.backend.scrub(f"planner {self.name}: {message}"))


def _explanation(data: dict) -> str | None:
    text = data.get("rationale") or data.get("lesson")
    return text if isinstance(text, str) else None


def _join(*parts: str | None) -> str | None:
    text = "\n".join(p for p in parts if p)
    return text or None
