"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, replaying a script.

Each POST to ``/v1/chat/completions`` takes the next scripted answer: a :class:`Reply`, or a
function of the request body returning one. Requests (bodies and headers) are kept for assertions.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    body: dict | str = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    hang: bool = False  # never answer (until the server stops)


def completion(content: str | None, finish_reason: str = "stop", refusal: str | None = None,
               **message_extra) -> Reply:
    message = {"role": "assistant", "content": content, "refusal": refusal, **message_extra}
    return Reply(body={
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })


def error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "test_error", "code": code}},
                 headers=headers or {})


def hold_request(server: ChatServer, number: int) -> threading.Event:
    """Fail requests before the ``number``-th with a 503 (a planner then falls back to the heuristic)
    and never answer that one; the event is set when it arrives, so a test knows the client is blocked
    inside that request and can signal it at a point where it is guaranteed to be."""
    arrived = threading.Event()

    def hold(_request: dict) -> Reply:
        arrived.set()
        return Reply(hang=True)

    server.add(*[error(503, "planner unavailable (test)")] * (number - 1), hold)
    return arrived


class ChatServer:
    def __init__(self):
        self.script: list[Reply | Callable[[dict], Reply]] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def add(self, *replies: Reply | Callable[[dict], Reply]) -> ChatServer:
        self.script.extend(replies)
        return self

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, request: dict) -> Reply:
        if not self.script:
            return error(500, "test script exhausted")
        item = self.script.pop(0)
        return item(request) if callable(item) else item

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append(request)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = server._next(request)
                if reply.hang:
                    server._stop.wait(30)
                    return
                payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data = payload.encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)  # the client may have given up (timeout tests)

            def log_message(self, *args):
                pass

        return Handler
