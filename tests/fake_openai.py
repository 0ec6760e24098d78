"""A small, real chat-completions HTTP server on 127.0.0.1 for tests (no network, no API key).

It speaks enough of the OpenAI protocol for the official `openai` client: `POST /v1/chat/completions`
(and `GET /v1/models`). Replies come from a FIFO queue of canned items first, then from a reply
function of the request body; an item is a string (the assistant text) or one of the faults below.
Every request is recorded, so a test can count calls and inspect what was sent.

    from fake_openai import FakeOpenAI, Reply, rate_limited, server_error, malformed  # tests/ is on sys.path under pytest

    with FakeOpenAI(reply=lambda body: "hello") as server:        # started on a free port
        server.enqueue(rate_limited(retry_after=0.5), server_error(500), "canned text")
        client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        ...
        assert server.request_count == 3
        server.requests[0].body["messages"]          # what the client sent
        server.set_reply(lambda body: Reply("slow", delay=0.3))

API:
- `FakeOpenAI(reply=None, model="fake-model")`; `.start()` / `.stop()` or a `with` block;
  `.base_url` ("http://127.0.0.1:PORT/v1").
- `.set_reply(fn)`: `fn(body: dict) -> str | Reply | Fault`; the default echoes the last user message.
- `.enqueue(*items)`: items served before the reply function, one per request, in order.
- `.requests` (a copy of the `RecordedRequest`s so far), `.request_count`, `.reset()`.
- `Reply(text, delay=0, finish_reason="stop", prompt_tokens=None, completion_tokens=None)`:
  usage defaults to whitespace word counts of the messages and of the text.
- Faults: `rate_limited(retry_after=None)` (429 with a `retry-after` header when given),
  `server_error(status=500)`, `malformed(body=...)` (200 with a body that is not a completion),
  `client_error(status=400, message=...)`, `slow(text, delay)` (a Reply that waits first), or a
  raw `Fault(status, body, headers, delay)`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    text: str
    delay: float = 0.0
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Fault:
    status: int
    body: bytes | str | dict = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class RecordedRequest:
    time: float
    method: str
    path: str
    headers: dict[str, str]
    body: Any


ReplyItem = str | Reply | Fault
ReplyFunction = Callable[[dict], ReplyItem]


def rate_limited(retry_after: float | None = None) -> Fault:
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    return Fault(429, body, headers)


def server_error(status: int = 500) -> Fault:
    return Fault(status, {"error": {"message": "The server had an error", "type": "server_error"}})


def client_error(status: int = 400, message: str = "Invalid request") -> Fault:
    return Fault(status, {"error": {"message": message, "type": "invalid_request_error"}})


def malformed(body: bytes | str = b'{"choices": [ this is not json') -> Fault:
    return Fault(200, body, {"content-type": "application/json"})


def slow(text: str, delay: float) -> Reply:
    return Reply(text, delay=delay)


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v.get("text", "") if isinstance(v, dict) else v) for v in value)
    return 0


def echo_last_user(body: dict) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return f"echo: {users[-1]['content']}" if users else "echo:"


class FakeOpenAI:
    def __init__(self, reply: ReplyFunction | None = None, model: str = "fake-model") -> None:
        self.model = model
        self._reply: ReplyFunction = reply or echo_last_user
        self._queue: deque[ReplyItem] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- behaviour -------------------------------------------------------------------------------
    def set_reply(self, fn: ReplyFunction) -> None:
        with self._lock:
            self._reply = fn

    def enqueue(self, *items: ReplyItem) -> None:
        with self._lock:
            self._queue.extend(items)

    def reset(self) -> None:
        """Forget recorded requests and queued items (the reply function stays)."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def completion_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- called by the handler -------------------------------------------------------------------
    def _record(self, request: RecordedRequest) -> ReplyItem:
        with self._lock:
            self._requests.append(request)
            if self._queue:
                return self._queue.popleft()
            reply = self._reply
        return reply(request.body if isinstance(request.body, dict) else {})

    def _completion(self, body: dict, reply: Reply) -> dict:
        with self._lock:
            self._ids += 1
            n = self._ids
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = sum(_words(m.get("content", "")) for m in body.get("messages", []))
        completion = reply.completion_tokens if reply.completion_tokens is not None else _words(reply.text)
        return {
            "id": f"chatcmpl-fake{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


def _make_handler(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes | str | dict, headers: dict[str, str] | None = None) -> None:
            if isinstance(body, dict):
                data = json.dumps(body).encode()
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = body
            headers = {"content-type": "application/json", **(headers or {})}
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): nothing to answer

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length)
            try:
                body: Any = json.loads(raw)
            except json.JSONDecodeError:
                body = raw.decode(errors="replace")
            item = server._record(
                RecordedRequest(time.time(), "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if isinstance(item, str):
                item = Reply(item)
            if item.delay:
                time.sleep(item.delay)
            if isinstance(item, Fault):
                self._send(item.status, item.body, item.headers)
            else:
                self._send(200, server._completion(body if isinstance(body, dict) else {}, item))

    return Handler
