"""Chat backend for an in-process transformers chat model (a local folder or ``.gguf`` file).

Two decoding modes, both greedy by default (seeded sampling when ``temperature > 0``), so a run
replays exactly:
- ``constrained``: JSON-schema-constrained decoding with outlines (optional extra
  ``agent-prune[constrained]``). The schema is built per context: layer indices are an enum of
  the layers that exist (protected ones excluded for depth), lists and the rationale are bounded.
- ``skeleton``: the JSON skeleton is written by us and the model only fills in the values (the
  rationale, the layer lists, the MLP share), each slot generated until its closing character.
``auto`` picks ``constrained`` when outlines imports, else ``skeleton``. Either way the reply is
validated like any other LLM reply. Only this module of the planners imports torch (lazily, via
the model loader), per DESIGN.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel

from agent_prune.agent.planners.llm import ChatReply, Notify, logger
from agent_prune.agent.planners.prompting import budget_layers
from agent_prune.agent.planners.replies import ProposalReply, split_reasoning
from agent_prune.agent.proposal import PlannerContext
from agent_prune.errors import InputError

RATIONALE_CHARS = 200
SLOT_TOKENS = {"text": 64, "ints": 40, "number": 6}
_CLOSERS = {"text": '"', "ints": "]", "number": ",}"}


@dataclass(frozen=True)
class Slot:
    kind: str  # "text" | "ints" | "number"


def constrained_schema(reply_model: type[BaseModel], context: PlannerContext) -> dict:
    """JSON schema for constrained decoding: only layers that exist, bounded lists and text."""
    n = context.num_layers
    any_layer = {"type": "integer", "enum": list(range(n))}
    if reply_model is not ProposalReply:
        return _object({"lesson": {"type": "string", "maxLength": RATIONALE_CHARS},
                        "avoid_layers": {"type": "array", "items": any_layer, "maxItems": 4}})
    avoid = set(context.rejected_layers)
    removable = [r.index for r in context.layers if not r.protected and r.index not in avoid]
    depth_items = {"type": "integer", "enum": removable or list(range(n))}
    k = min(2 * budget_layers(context), len(removable) or 1)
    depth = _object({"layers": {"type": "array", "items": depth_items, "minItems": 1, "maxItems": k}})
    width = _object({"layers": {"type": "array", "items": any_layer, "maxItems": n},
                     "mlp_share": {"type": "number", "minimum": 0, "maximum": 1}})
    return _object({"rationale": {"type": "string", "maxLength": RATIONALE_CHARS},
                    "depth": depth if "depth" in context.branches else {"type": "null"},
                    "width": width if "width" in context.branches else {"type": "null"}})


def skeleton(reply_model: type[BaseModel], context: PlannerContext) -> list[str | Slot]:
    """The reply with its values left as slots for the model to fill."""
    if reply_model is not ProposalReply:
        return ['{"lesson": "', Slot("text"), '", "avoid_layers": [', Slot("ints"), "]}"]
    parts: list[str | Slot] = ['{"rationale": "', Slot("text"), '", "depth": ']
    parts += ['{"layers": [', Slot("ints"), "]}"] if "depth" in context.branches else ["null"]
    parts += [', "width": ']
    if "width" in context.branches:
        parts += ['{"layers": [', Slot("ints"), '], "mlp_share": ', Slot("number"), "}"]
    else:
        parts += ["null"]
    return [*parts, "}"]


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


class HFChat:
    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "float32",
                 decoding: str = "auto", temperature: float = 0.0, seed: int = 0,
                 max_tokens: int = 320, notify: Notify | None = None):
        from agent_prune.models.loading import resolve_model_source

        if decoding not in ("auto", "constrained", "skeleton"):
            raise InputError(f"unknown decoding mode '{decoding}'", "use auto, constrained or skeleton")
        self.source = resolve_model_source(model)  # a bad path fails now, not at the first step
        self.model_spec, self.device, self.dtype = model, device, dtype
        self.decoding = _pick_decoding(decoding)
        self.temperature, self.seed, self.max_tokens = temperature, seed, max_tokens
        self.notify = notify or logger.warning
        self._loaded = None
        self._outlines_model = None

    def describe(self) -> dict:
        return {"backend": "hf", "model": self.model_spec, "decoding": self.decoding,
                "temperature": self.temperature, "seed": self.seed, "device": self.device}

    def scrub(self, text: str) -> str:
        return text

    def chat(self, messages: list[dict], reply_model: type[BaseModel],
             context: PlannerContext) -> ChatReply:
        loaded = self._load()
        prompt = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.decoding == "constrained":
            text = self._constrained(prompt, constrained_schema(reply_model, context))
        else:
            text = self._fill(prompt, skeleton(reply_model, context))
        answer, thoughts = split_reasoning(text)
        return ChatReply(text=answer, reasoning=thoughts, mode=self.decoding,
                         problem=None if answer else "the reply was empty; answer with one JSON object")

    def _load(self):
        if self._loaded is None:
            from agent_prune.models.loading import load_model

            self._loaded = load_model(self.model_spec, device=self.device, dtype=self.dtype)
        return self._loaded

    def _generation_kwargs(self) -> dict:
        import torch

        if self.temperature > 0:
            torch.manual_seed(self.seed)
            return {"do_sample": True, "temperature": self.temperature}
        return {"do_sample": False}

    def _constrained(self, prompt: str, schema: dict) -> str:
        import outlines
        from outlines.types import JsonSchema

        if self._outlines_model is None:
            self._outlines_model = outlines.from_transformers(self._loaded.model, self._loaded.tokenizer)
        generator = outlines.Generator(self._outlines_model, JsonSchema(json.dumps(schema)))
        return generator(prompt, max_new_tokens=self.max_tokens, **self._generation_kwargs())

    def _fill(self, prompt: str, parts: list[str | Slot]) -> str:
        text = ""
        for part in parts:
            text += part if isinstance(part, str) else self._slot(prompt + text, part)
        return text

    def _slot(self, prefix: str, slot: Slot) -> str:
        """Generate one value until its closing character; return it cleaned for its place."""
        import torch

        tokenizer, model = self._loaded.tokenizer, self._loaded.model
        inputs = tokenizer(prefix, return_tensors="pt", add_special_tokens=False).to(model.device)
        start = inputs["input_ids"].shape[1]
        stop = _CloserStop(tokenizer, start, _CLOSERS[slot.kind])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=SLOT_TOKENS[slot.kind], stopping_criteria=[stop],
                                 pad_token_id=tokenizer.pad_token_id, **self._generation_kwargs())
        value = tokenizer.decode(out[0, start:], skip_special_tokens=True)
        return _clean(value, slot.kind)


def _clean(value: str, kind: str) -> str:
    cut = min((i for i in (value.find(c) for c in _CLOSERS[kind]) if i >= 0), default=len(value))
    value = value[:cut]
    if kind == "text":
        return json.dumps(" ".join(value.split())[:RATIONALE_CHARS])[1:-1]
    return value.strip().rstrip(",").strip()


class _CloserStop:
    """Stop generating once the new text contains one of the slot's closing characters."""

    def __init__(self, tokenizer, start: int, closers: str):
        self.tokenizer, self.start, self.closers = tokenizer, start, closers

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=True)
        done = any(c in text for c in self.closers) or "\n\n" in text
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _pick_decoding(decoding: str) -> str:
    if decoding == "skeleton":
        return decoding
    try:
        import outlines  # noqa: F401
    except ImportError:
        if decoding == "constrained":
            raise InputError("constrained decoding needs outlines",
                             "pip install 'agent-prune[constrained]' or use decoding=skeleton") from None
        return "skeleton"
    return "constrained"
