"""Chat backend for an in-process transformers chat model (a local folder or ``.gguf`` file).

Two decoding modes, both greedy by default (seeded sampling when ``temperature > 0``), so a run
replays exactly:
- ``constrained``: JSON-schema-constrained decoding with outlines (optional extra
  ``agent-prune[constrained]``). The schema is built per context: layer indices are an enum of
  the layers that exist (removable ones for depth), lists and the rationale are bounded.
- ``skeleton``: no extra dependency. We write the JSON skeleton and the model fills in only the
  values (rationale, layer lists, MLP share), each slot decoded token by token under the slot's
  own acceptance rule (``slots.py``), reusing one KV cache for the whole reply.
``skeleton`` is the default: as reliable for this schema, faster here, and the same in every
environment (a run's behaviour should not depend on which extras happen to be installed). Either
way the reply is validated like any other LLM reply. Only this module of the planners imports
torch (lazily, via the model loader), per DESIGN.md.
"""

from __future__ import annotations

import json
from functools import cached_property

from pydantic import BaseModel

from agent_prune.agent.planners.llm import ChatReply
from agent_prune.agent.planners.replies import split_reasoning
from agent_prune.agent.planners.slots import Slot, context_schema, skeleton
from agent_prune.agent.proposal import PlannerContext
from agent_prune.errors import InputError

CANDIDATES = 64  # tokens tried first at each step (most likely first) for one that fits the slot


class HFChat:
    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "float32",
                 decoding: str = "skeleton", temperature: float = 0.0, seed: int = 0,
                 max_tokens: int = 320):
        from agent_prune.models.loading import resolve_model_source

        if decoding not in ("skeleton", "constrained"):
            raise InputError(f"unknown decoding mode '{decoding}'", "use skeleton or constrained")
        self.source = resolve_model_source(model)  # a bad path fails now, not at the first step
        self.model_spec, self.device, self.dtype = model, device, dtype
        self.decoding = decoding
        if decoding == "constrained":
            _require_outlines()
        self.temperature, self.seed, self.max_tokens = temperature, seed, max_tokens
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
            text = self._constrained(prompt, context_schema(reply_model, context))
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
        """Write the skeleton, letting the model fill each slot; one KV cache for the whole reply."""
        import torch
        from transformers import DynamicCache

        tokenizer, model = self._loaded.tokenizer, self._loaded.model
        cache, text, pending = DynamicCache(config=model.config), "", prompt
        generator = torch.Generator().manual_seed(self.seed)
        for part in parts:
            if isinstance(part, str):
                text, pending = text + part, pending + part
                continue
            ids = tokenizer(pending, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                value, fed = self._generate(cache, ids.to(model.device), part, generator)
            cache.crop(-fed)  # forget the raw slot tokens; the cleaned value is fed with what follows
            text, pending = text + value, value
        return text

    def _generate(self, cache, ids, slot: Slot, generator) -> tuple[str, int]:
        """Fill one slot: at each step the most likely token (or a seeded sample) that keeps the
        slot's text acceptable; stop at the slot's closing character. Returns (value, tokens fed)."""
        import torch

        tokenizer, model = self._loaded.tokenizer, self._loaded.model
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
        tokens, text, fed = [], "", 0
        for _ in range(slot.max_tokens):
            choice = None
            for token in self._candidates(logits, generator):
                candidate = tokenizer.decode([*tokens, token])
                if token not in self._special and candidate != text and slot.accepts(candidate):
                    choice = token
                    break
            if choice is None:
                break
            tokens.append(choice)
            text = tokenizer.decode(tokens)
            if slot.finished(text):
                break
            logits = model(input_ids=torch.tensor([[choice]], device=ids.device),
                           cache=cache, use_cache=True).logits[0, -1]
            fed += 1
        return slot.value(text), fed

    def _candidates(self, logits, generator):
        """Tokens to try, best first: the top CANDIDATES (sampled order when temperature > 0),
        then, only if none of them fits the slot, the rest of the vocabulary by logit."""
        import torch

        top = torch.topk(logits.float(), CANDIDATES)
        if self.temperature <= 0:
            yield from top.indices.tolist()
        else:
            probs = torch.softmax(top.values / self.temperature, dim=-1).cpu()
            order = torch.multinomial(probs, CANDIDATES, replacement=False, generator=generator)
            yield from top.indices.cpu()[order].tolist()
        yield from torch.argsort(logits.float(), descending=True)[CANDIDATES:].tolist()

    @cached_property
    def _special(self) -> frozenset[int]:
        return frozenset(self._loaded.tokenizer.all_special_ids)


def _require_outlines() -> None:
    try:
        import outlines  # noqa: F401
    except ImportError:
        raise InputError("constrained decoding needs outlines",
                         "pip install 'agent-prune[constrained]', or use decoding=skeleton") from None
