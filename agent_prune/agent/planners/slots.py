"""The JSON skeleton of a planner reply, with typed slots for the values a local model fills in.

The skeleton decoder (``hf_chat``) writes the literal JSON itself and lets the model generate only
inside slots; at each step it takes the most likely token that keeps the slot's text acceptable
(:meth:`Slot.accepts`), so layer lists hold only layers that exist (depth: only removable ones that fit
the step), without repeats, with enough layers to hold the step (width), and the MLP share is a
number in [0, 1]. Pure string
functions, no model here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pydantic import BaseModel

from agent_prune.agent.planners.budget import (
    mlp_capacity,
    open_branches,
    removable_layers,
    width_min_layers,
)
from agent_prune.agent.planners.prompting import budget_layers
from agent_prune.agent.planners.replies import ProposalReply
from agent_prune.agent.proposal import PlannerContext

TEXT_CHARS = 200
_SHARE = re.compile(r"(0(\.\d{0,2})?|1(\.0{0,2})?)?")


@dataclass(frozen=True)
class Slot:
    kind: str  # "text" | "ints" | "share"
    allowed: frozenset[int] = frozenset()  # ints: the values that may appear
    min_items: int = 0
    max_items: int = 0
    allow_empty: bool = False  # ints: [] is fine besides min_items..max_items values

    @property
    def max_tokens(self) -> int:
        return {"text": 48, "share": 5}.get(self.kind, min(4 * self.max_items + 2, 48))

    def accepts(self, text: str) -> bool:
        """Can ``text`` (what the model wrote so far) still become a valid value?"""
        body, closed = self._split(text)
        if self.kind == "text":
            return "\n" not in body and len(body) <= TEXT_CHARS
        if self.kind == "share":
            return _SHARE.fullmatch(body.rstrip() if closed else body) is not None and (
                not closed or body.strip() != "")
        return self._ints_ok(body, closed)

    def finished(self, text: str) -> bool:
        return self._split(text)[1]

    def value(self, text: str) -> str:
        """The JSON text to splice into the skeleton for what the model wrote."""
        body, _ = self._split(text)
        if self.kind == "text":
            return json.dumps(" ".join(body.split())[:TEXT_CHARS])[1:-1]
        if self.kind == "share":
            return body.strip().rstrip(".")
        numbers: list[int] = []
        for part in body.split(","):
            part = part.strip()
            if part.isdigit() and int(part) in self.allowed and int(part) not in numbers:
                numbers.append(int(part))
        return ", ".join(map(str, numbers[: self.max_items]))

    def _split(self, text: str) -> tuple[str, bool]:
        closers = {"text": '"', "ints": "]", "share": ",}\n"}[self.kind]
        cut = min((i for i in (text.find(c) for c in closers) if i >= 0), default=-1)
        return (text, False) if cut < 0 else (text[:cut], True)

    def _ints_ok(self, body: str, closed: bool) -> bool:
        if "\n" in body or "  " in body:  # whitespace alone would let a slot run out of tokens
            return False
        *done, last = [p.strip() for p in body.split(",")]
        values = [int(p) for p in done if p.isdigit()]
        if len(values) != len(done) or any(v not in self.allowed for v in values):
            return False
        if len(set(values)) != len(values) or len(done) > self.max_items:
            return False
        if closed and last == "":
            return not done and (self.min_items == 0 or self.allow_empty)
        if last == "":
            return len(done) < self.max_items
        if not last.isdigit() or len(done) + 1 > self.max_items:
            return False
        if closed:
            return int(last) in self.allowed and int(last) not in values and len(done) + 1 >= self.min_items
        return any(str(a).startswith(last) and a not in values for a in self.allowed)


def skeleton(reply_model: type[BaseModel], context: PlannerContext) -> list[str | Slot]:
    """The reply with its values left as slots for the model to fill."""
    n = context.num_layers
    every = frozenset(range(n))
    if reply_model is not ProposalReply:
        return ['{"lesson": "', Slot("text"), '", "avoid_layers": [', Slot("ints", every, 0, 4), "]}"]
    branches = open_branches(context)
    parts: list[str | Slot] = ['{"rationale": "', Slot("text"), '", "depth": ']
    if "depth" in branches:
        removable = frozenset(removable_layers(context))
        depth_items = min(2 * budget_layers(context), len(removable))
        parts += ['{"layers": [', Slot("ints", removable, 1, depth_items), "]}"]
    else:
        parts += ["null"]
    parts += [', "width": ']
    if "width" in branches:
        thinnable = frozenset(r.index for r in context.layers if mlp_capacity(context, r.index) > 0)
        layers = Slot("ints", thinnable or every, width_min_layers(context), n, allow_empty=True)
        parts += ['{"layers": [', layers, '], "mlp_share": ', Slot("share"), "}"]
    else:
        parts += ["null"]
    return [*parts, "}"]


def context_schema(reply_model: type[BaseModel], context: PlannerContext) -> dict:
    """The same limits as the skeleton, as a JSON schema for grammar-constrained decoders (outlines
    in-process, llama-cpp-python's ``json_object`` + ``schema``): layer enums, bounded lists and
    text, and the MLP share as one of five values (grammars do not enforce numeric bounds)."""
    n = context.num_layers
    any_layer = {"type": "integer", "enum": list(range(n))}
    if reply_model is not ProposalReply:
        return _object({"lesson": {"type": "string", "maxLength": TEXT_CHARS},
                        "avoid_layers": {"type": "array", "items": any_layer, "maxItems": 4}})
    branches, removable = open_branches(context), removable_layers(context)
    k = min(2 * budget_layers(context), len(removable) or 1)
    depth = _object({"layers": {"type": "array", "items": {"type": "integer", "enum": removable or [0]},
                                "minItems": 1, "maxItems": k}})
    thinnable = [r.index for r in context.layers if mlp_capacity(context, r.index) > 0] or list(range(n))
    item = {"type": "integer", "enum": thinnable}
    some = {"type": "array", "items": item, "minItems": width_min_layers(context), "maxItems": n}
    none = {"type": "array", "items": item, "maxItems": 0}  # without items grammars allow any list
    width = _object({"layers": {"anyOf": [none, some]},
                     "mlp_share": {"type": "number", "enum": [0.0, 0.25, 0.5, 0.75, 1.0]}})
    return _object({"rationale": {"type": "string", "maxLength": TEXT_CHARS},
                    "depth": depth if "depth" in branches else {"type": "null"},
                    "width": width if "width" in branches else {"type": "null"}})


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}
