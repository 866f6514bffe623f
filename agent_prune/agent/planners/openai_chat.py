"""Chat backend for OpenAI and any OpenAI-compatible server (Ollama, vLLM, llama.cpp, LM Studio).

Structured output first: ``chat.completions.parse(response_format=<wire model>)`` sends a JSON
schema, and ``.parsed`` / ``.refusal`` / ``LengthFinishReasonError`` say what came back. A server
that rejects ``response_format`` (HTTP 400/422) is asked for plain text from then on, and the reply
is read tolerantly (first JSON object). Transport failures are classified into one-line messages:
429, 5xx and timeouts are retried with exponential backoff (``Retry-After`` honoured), the rest
fail the request at once. The API key never appears in a message: every string leaving this module
goes through :meth:`OpenAIChat.scrub`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import openai
from pydantic import BaseModel, ValidationError

from agent_prune.agent.planners.base import Attempt
from agent_prune.agent.planners.llm import ChatReply, Notify, logger
from agent_prune.agent.planners.replies import split_reasoning
from agent_prune.agent.planners.slots import context_schema
from agent_prune.agent.proposal import PlannerContext
from agent_prune.errors import InputError

OPENAI_URL = "https://api.openai.com/v1"
HOSTED_KEY_ENV = "OPENAI_API_KEY"
# A custom server never gets OPENAI_API_KEY unless asked (it would hand a hosted key to a third party).
SERVER_KEY_ENV = "AGENT_PRUNE_PLANNER_API_KEY"
_SAMPLING_PARAMS = ("temperature", "seed", "max_tokens", "max_completion_tokens")
# Ways to ask for JSON, strictest first: OpenAI json_schema (OpenAI, Ollama, vLLM, llama.cpp's C++
# server, LM Studio), json_object with this context's schema (llama-cpp-python turns it into a
# grammar: only layers that exist, depth closed when nothing fits), plain text.
MODES = ("json_schema", "json_object", "json_text")


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


class OpenAIChat:
    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 120.0, max_retries: int = 2, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, temperature: float | None = 0.0, max_tokens: int = 1024,
                 seed: int | None = None, structured: str = "auto", notify: Notify | None = None):
        if structured not in ("auto", *MODES):
            raise InputError(f"unknown structured-output mode '{structured}'",
                             f"use auto, {', '.join(MODES)}")
        self.model = model
        self.hosted = base_url is None
        self.base_url = OPENAI_URL if self.hosted else normalise_base_url(base_url)
        self.api_key_env = api_key_env or (HOSTED_KEY_ENV if self.hosted else SERVER_KEY_ENV)
        key = os.environ.get(self.api_key_env) or None
        if self.hosted and not key:
            raise InputError(f"${self.api_key_env} is not set for planner openai:{model}",
                             f"export {self.api_key_env}=... or use openai:MODEL@URL for a local server")
        self._secrets = [s for s in (key, _userinfo(self.base_url)) if s]
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.structured = structured
        self._mode = MODES[0] if structured == "auto" else structured
        self.sampling = {"temperature": temperature, "seed": seed,
                         ("max_completion_tokens" if self.hosted else "max_tokens"): max_tokens}
        self.notify = notify or logger.warning
        self.client = openai.OpenAI(api_key=key or "no-key", base_url=self.base_url,
                                    timeout=timeout_s, max_retries=0)

    def describe(self) -> dict:
        return {"backend": "openai", "model": self.model, "base_url": self.scrub(self.base_url),
                "api_key_env": self.api_key_env, "structured": self.structured,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries,
                **{k: v for k, v in self.sampling.items() if v is not None}}

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def chat(self, messages: list[dict], reply_model: type[BaseModel],
             context: PlannerContext) -> ChatReply:
        failed: list[Attempt] = []
        try_ = 0
        while True:
            start = time.monotonic()
            try:
                reply = self._request(messages, reply_model, context)
            except _Fatal as exc:
                return ChatReply(failure=self.scrub(str(exc)), mode=self._mode, failed_tries=failed)
            except _Transient as exc:
                message = self.scrub(str(exc))
                if try_ == self.max_retries:
                    tries = f"; gave up after {try_ + 1} tries" if try_ else ""
                    return ChatReply(failure=message + tries, mode=self._mode, failed_tries=failed)
                delay = self._delay(try_, exc.retry_after)
                failed.append(Attempt(prompt=messages, error=message, mode=self._mode,
                                      duration_s=round(time.monotonic() - start, 3)))
                self.notify(f"planner openai:{self.model}: {message}; retrying in {delay:.1f} s "
                            f"({try_ + 1}/{self.max_retries})")
                time.sleep(delay)
                try_ += 1
                continue
            reply.failed_tries = failed
            return reply

    def _delay(self, try_: int, retry_after: float | None) -> float:
        delay = retry_after if retry_after is not None else self.backoff_s * 2 ** try_
        return min(max(delay, 0.0), self.max_backoff_s)

    def _request(self, messages: list[dict], reply_model: type[BaseModel],
                 context: PlannerContext) -> ChatReply:
        while True:
            kwargs = {k: v for k, v in self.sampling.items() if v is not None}
            kwargs.update(model=self.model, messages=messages)
            completions = self.client.chat.completions.with_raw_response
            try:
                if self._mode == "json_schema":
                    return self._read(completions.parse(response_format=reply_model, **kwargs))
                if self._mode == "json_object":
                    schema = {"type": "json_object", "schema": context_schema(reply_model, context)}
                    return self._read(completions.create(response_format=schema, **kwargs))
                return self._read(completions.create(**kwargs))
            except openai.APIStatusError as exc:
                detail = _error_detail(exc)
                if exc.status_code in (400, 422) and self._drop_unsupported(detail):
                    continue
                if self._rejects_format(exc.status_code, detail):
                    rejected, self._mode = self._mode, MODES[MODES.index(self._mode) + 1]
                    self.notify(self.scrub(f"planner openai:{self.model}: the server rejected "
                                           f"response_format {rejected} (HTTP {exc.status_code}: "
                                           f"{detail}); using {self._mode} from now on"))
                    continue
                raise self._classify(exc) from None
            except openai.OpenAIError as exc:
                raise self._classify(exc) from None

    def _rejects_format(self, status: int, detail: str) -> bool:
        """In auto mode a 400/422 (or a 5xx naming response_format, as llama-cpp-python sends) on a
        structured request means: try the next, plainer way of asking for JSON."""
        if self.structured != "auto" or self._mode == MODES[-1]:
            return False
        return status in (400, 422) or (status >= 500 and "response_format" in detail)

    def _drop_unsupported(self, detail: str) -> bool:
        """Reasoning models refuse some sampling parameters; drop the one named and ask again."""
        if "unsupported" not in detail.lower():
            return False
        for name in _SAMPLING_PARAMS:
            if f"'{name}'" in detail and self.sampling.get(name) is not None:
                value = self.sampling.pop(name)
                if name == "max_tokens":
                    self.sampling["max_completion_tokens"] = value
                self.notify(f"planner openai:{self.model}: the server does not accept '{name}'; "
                            "leaving it out")
                return True
        return False

    def _read(self, raw) -> ChatReply:
        mode = self._mode
        try:
            body = json.loads(raw.http_response.text)
            choice = body["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            return ChatReply(problem="the server's reply held no chat message", mode=mode,
                             text=self.scrub(raw.http_response.text[:500]))
        answer, thoughts = split_reasoning(message.get("content") or "")
        server_reasoning = message.get("reasoning_content") or message.get("reasoning")
        reasoning = "\n".join(r for r in (server_reasoning, thoughts) if isinstance(r, str) and r)
        reply = ChatReply(text=self.scrub(answer), reasoning=self.scrub(reasoning) or None, mode=mode)
        if message.get("refusal"):
            reply.failure = self.scrub(f"the model refused: {str(message['refusal'])[:200]}")
        elif choice.get("finish_reason") == "length":
            reply.problem = ("the reply was cut off at the token limit; answer with a shorter "
                             "rationale and the JSON object only")
        elif choice.get("finish_reason") == "content_filter":
            reply.failure = "the server's content filter stopped the reply"
        elif not answer:
            reply.problem = "the reply was empty; answer with one JSON object"
        elif mode == "json_schema":
            reply.data = _parsed(raw)
        return reply

    def _classify(self, exc: openai.OpenAIError) -> Exception:
        if isinstance(exc, openai.APITimeoutError):
            return _Transient(f"no reply within {self.timeout_s:g} s (timeout) from {self.base_url}")
        if isinstance(exc, openai.APIConnectionError):
            return _Fatal(_connection_message(exc, self.base_url))
        if isinstance(exc, openai.APIStatusError):
            status, detail = exc.status_code, _error_detail(exc)
            if status == 429 and getattr(exc, "code", None) == "insufficient_quota":
                return _Fatal(f"the account's quota is exhausted (HTTP 429: {detail})")
            if status == 429:
                return _Transient(f"rate limited (HTTP 429: {detail})", _retry_after(exc))
            if status >= 500:
                return _Transient(f"server error (HTTP {status}: {detail})", _retry_after(exc))
            if status == 401:
                return _Fatal(f"the server rejected the API key (HTTP 401: {detail}); "
                              f"check ${self.api_key_env}")
            if status == 404:
                return _Fatal(f"model '{self.model}' or endpoint not found at {self.base_url} "
                              f"(HTTP 404: {detail})")
            if status in (400, 422):
                return _Fatal(f"the server rejected the request (HTTP {status}: {detail})")
            return _Fatal(f"HTTP {status}: {detail}")
        return _Fatal(f"{type(exc).__name__}: {str(exc)[:200]}")


def _parsed(raw) -> dict | None:
    """The server-side structured parse, or None when the content did not match the schema (the
    driver then reads the text tolerantly and reports precise problems)."""
    try:
        message = raw.parse().choices[0].message
    except (ValidationError, ValueError, openai.OpenAIError):
        return None
    return message.parsed.model_dump() if message.parsed is not None else None


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") if isinstance(inner, dict) else inner
        if text:
            return " ".join(str(text).split())[:200]
    return " ".join(str(exc.message).split())[:200]


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _connection_message(exc: openai.APIConnectionError, url: str) -> str:
    chain, cause = [], exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(c) for c in chain).lower()
    host = urlsplit(url).hostname or url
    if any(isinstance(c, socket.gaierror) for c in chain) or any(
            s in text for s in ("name or service not known", "nodename nor servname",
                                "temporary failure in name resolution", "getaddrinfo")):
        return f"cannot resolve host '{host}' (DNS failure); check the planner URL {url}"
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "connection refused" in text:
        return f"connection refused at {url}; is the server running?"
    detail = str(chain[-1])[:160] if chain else str(exc)[:160]
    return f"cannot connect to {url}: {detail}"


def normalise_base_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1`` (every supported server serves /v1)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"planner URL '{url}' is not an http(s) URL",
                         "use e.g. http://127.0.0.1:11434/v1")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _userinfo(url: str) -> str | None:
    netloc = urlsplit(url).netloc
    return netloc.rsplit("@", 1)[0] if "@" in netloc else None
