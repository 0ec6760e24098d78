"""The API server: a FastAPI app with OpenAI-compatible chat completions over one model.

`create_app(pipe, config)` builds the app: `POST /v1/chat/completions` (plain and SSE streaming),
`GET /v1/models`, `GET /health`, and the web demo at `/`. A request is read with a byte limit,
validated (`protocol`), turned into prompt ids and pixels in a thread pool, checked against the
context length, and only then queued on the `Batcher`, the one thread that runs the model. A full
queue answers 503 with `retry-after`; a client that disconnects has its row cancelled. With an API
key, every route but `/health` needs `Authorization: Bearer KEY` (compared in constant time).
`run_server` serves the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from vitune.errors import VituneError
from vitune.generation import SamplingParams, StepEvent
from vitune.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from vitune.serve.protocol import (
    APIError,
    ChatRequest,
    Limits,
    bad_request,
    chunk_body,
    completion_body,
    completion_id,
    parse_chat_request,
    parse_json_body,
    sse,
    usage_chunk,
)

log = logging.getLogger(__name__)

# Paths open without a key: the liveness probe only.
_OPEN_PATHS = ("/health",)
# Paths the API-key middleware guards; the web demo's own routes are guarded by its login page.
_KEYED_PREFIXES = ("/v1", "/docs", "/redoc", "/openapi.json")


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    max_queue: int = 128
    batch_wait_s: float = 0.005
    max_concurrent_prepare: int = 2  # image decoding + tokenization at once (bounds memory)
    retry_after_s: int = 1
    web: bool = True


@dataclass
class Prepared:
    request: ChatRequest
    prompt_ids: list[int]
    pixel_values: Any
    params: SamplingParams


class Server:
    """State shared by the routes: the pipeline, the batcher, and request preparation."""

    def __init__(self, pipe: Any, config: ServeConfig) -> None:
        self.pipe = pipe
        self.config = config
        # The worker thread decodes with pipe.processor's tokenizer at every step; request threads
        # get their own copy so they never borrow the same Rust tokenizer concurrently.
        self.processor = copy.deepcopy(pipe.processor)
        self.batcher = Batcher(pipe.decoder, config.max_batch_size, config.max_queue, config.batch_wait_s)
        self.context_length = int(pipe.context_length)
        self._prepare_slots = threading.BoundedSemaphore(config.max_concurrent_prepare)
        self._tokenizer_lock = threading.Lock()
        vocab = self.processor.tokenizer.get_vocab()
        # No token covers more characters than the longest vocabulary entry, so a text longer than
        # this cannot fit in the context whatever the tokenizer does: refuse it before tokenizing.
        self.max_prompt_chars = 2 * self.context_length * max(8, max((len(t) for t in vocab), default=8)) + 4096
        self.started = time.time()

    # -- request preparation (runs in a worker thread of the pool) ------------------------------
    def prepare(self, body: dict[str, Any]) -> Prepared:
        """Validate an API request body and turn it into prompt ids and pixels (raises APIError)."""
        with self._prepare_slots:
            req = parse_chat_request(body, self.config.limits)
            if req.model is not None and req.model != self.config.model_name:
                raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.config.model_name}'",
                               "invalid_request_error", "model", "model_not_found")
            ids, pixels, params = self.encode(req.messages, req.images, req.params)
        return Prepared(req, ids, pixels, params)

    def encode(self, messages: list[dict[str, Any]], images: list[Any], params: SamplingParams) -> tuple[list[int], Any, SamplingParams]:
        """Prompt ids, pixels and the token budget clamped to the context (raises APIError)."""
        chars = 0
        for m in messages:
            content = m["content"]
            chars += len(content) if isinstance(content, str) else sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
        if chars > self.max_prompt_chars:
            raise bad_request(f"the messages have {chars} characters, far more than fit in the model's context of "
                              f"{self.context_length} tokens", param="messages", code="context_length_exceeded")
        try:
            with self._tokenizer_lock:
                ids, pixels = self.processor.encode_prompt(messages, images)
        except VituneError as err:
            raise bad_request(f"messages: {err}", param="messages") from None
        # The prompt must hold exactly the image placeholders of its images: a row whose text smuggled
        # in the placeholder token would fail the whole batch it shares at the feature splice.
        cfg = self.processor.config
        if ids.count(cfg.image_token_id) != len(images) * cfg.num_image_tokens:
            raise bad_request("messages: the text contains the model's image placeholder token; send images as image_url parts",
                              param="messages")
        room = self.context_length - len(ids)
        if room < 1:
            raise bad_request(f"the prompt is {len(ids)} tokens (images included), which does not fit the model's context of "
                              f"{self.context_length} tokens; shorten the messages or send fewer images",
                              param="messages", code="context_length_exceeded")
        # Clamp the budget to what is left of the context; finish_reason "length" tells the client.
        if params.max_new_tokens > room:
            params = dataclasses.replace(params, max_new_tokens=room)
        return ids, pixels, params

    def submit_job(self, ids: list[int], pixels: Any, params: SamplingParams, sink: Any) -> Job:
        job = Job(ids, pixels, params, sink)
        try:
            self.batcher.submit(job)
        except QueueFull as err:
            raise APIError(503, f"the server is busy ({err}); retry shortly", "server_error", None, "server_busy",
                           headers={"retry-after": str(self.config.retry_after_s)}) from None
        except ShuttingDown as err:
            raise APIError(503, str(err), "server_error", None, "shutting_down", headers={"retry-after": str(self.config.retry_after_s)}) from None
        return job

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> tuple[Job, asyncio.Queue]:
        """Queue a prepared request; its events arrive on the returned asyncio queue."""
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        return self.submit_job(prepared.prompt_ids, prepared.pixel_values, prepared.params, sink), queue


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class APIKeyMiddleware:
    """Requires `Authorization: Bearer KEY` on the API routes; compares in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, web_mounted: bool) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.web_mounted = web_mounted

    def _open(self, path: str) -> bool:
        if path in _OPEN_PATHS:
            return True
        # The web demo's routes have their own login (the key as password); everything else is keyed.
        return self.web_mounted and not path.startswith(_KEYED_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if not hmac.compare_digest(given, self.expected):
            message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
            err = APIError(401, message, "invalid_request_error", None, "invalid_api_key", headers={"www-authenticate": "Bearer"})
            await _error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(int(declared), limit)
        except ValueError:
            raise bad_request("the Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more; the limit is {limit} bytes (--max-request-bytes)",
                    "invalid_request_error", None, "request_too_large")


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its job however the response ends (disconnect included),
    even if the body iterator never started."""

    def __init__(self, content: AsyncIterator[bytes], job: Job, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["text", "image_url"]},
                "text": {"type": "string"},
                "image_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}, "detail": {"type": "string"}}},
            }}}]},
        }}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "repetition_penalty": {"type": "number"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    },
}


def create_app(pipe: Any, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `pipe` (a `vitune.inference.Pipeline`); the batcher runs in its lifespan."""
    server = Server(pipe, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.batcher.stop)

    app = FastAPI(title="vitune", version="1", lifespan=lifespan,
                  description="OpenAI-compatible chat completions for a LLaVA model, with a web demo at /.")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse({"error": {"message": str(err.detail), "type": kind, "param": None, "code": code}},
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    @app.get("/health", summary="liveness and queue state (no key needed)")
    async def health() -> dict[str, Any]:
        b = server.batcher
        return {"status": "ok", "model": config.model_name, "queued": b.queued, "running": b.running,
                "max_queue": b.max_queue, "max_batch_size": b.max_batch_size}

    @app.get("/v1/models", summary="the one model this server serves")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(server.started), "owned_by": "vitune"}]}

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (stream with \"stream\": true)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}})
    async def chat_completions(request: Request) -> Response:
        body = parse_json_body(await read_body(request, config.limits.max_request_bytes))
        prepared = await run_in_threadpool(server.prepare, body)
        job, queue = server.submit(prepared, asyncio.get_running_loop())
        if prepared.request.stream:
            return _CancellingStream(_stream(request, prepared, job, queue), job, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            text, finish, output_ids = await _collect(request, job, queue)
        finally:
            job.cancel()  # no-op when finished; stops the row when this handler was cancelled
        if finish == "cancelled":
            return Response(status_code=499)
        return JSONResponse(completion_body(completion_id(), config.model_name, text, finish, len(prepared.prompt_ids), len(output_ids)))

    async def _collect(request: Request, job: Job, queue: asyncio.Queue, poll_s: float = 0.25) -> tuple[str, str, list[int]]:
        """The whole answer; checks every `poll_s` whether the client is still there."""
        pieces: list[str] = []
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=poll_s)
            except TimeoutError:
                event = None
            if time.monotonic() - checked >= poll_s:
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    return "".join(pieces), "cancelled", []
            if event is None:
                continue
            if isinstance(event, BaseException):
                raise _from_worker(event)
            pieces.append(event.text)
            if event.finish_reason is not None:
                return "".join(pieces).rstrip(), event.finish_reason, event.output_ids or []

    async def _stream(request: Request, prepared: Prepared, job: Job, queue: asyncio.Queue) -> AsyncIterator[bytes]:
        cid, created, name = completion_id(), int(time.time()), config.model_name
        usage_on = prepared.request.include_usage
        yield sse(chunk_body(cid, name, created, {"role": "assistant", "content": ""}, None, usage_on))
        pending = ""  # trailing whitespace is held back so the streamed text equals the plain answer
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    err = _from_worker(event)
                    yield sse(err.body())
                    break
                assert isinstance(event, StepEvent)
                text = pending + event.text
                if event.finish_reason is not None:
                    text = text.rstrip()
                    pending = ""
                else:
                    stripped = text.rstrip()
                    pending = text[len(stripped):]
                    text = stripped
                if text:
                    yield sse(chunk_body(cid, name, created, {"content": text}, None, usage_on))
                if event.finish_reason is not None:
                    if event.finish_reason == "cancelled":
                        return
                    yield sse(chunk_body(cid, name, created, {}, event.finish_reason, usage_on))
                    if usage_on:
                        yield sse(usage_chunk(cid, name, created, len(prepared.prompt_ids), len(event.output_ids or [])))
                    break
            yield sse("[DONE]")
        finally:
            job.cancel()

    if config.web:
        from vitune.serve.web import mount_web_demo

        app = mount_web_demo(app, server)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, web_mounted=config.web)
    return app


def _from_worker(err: BaseException) -> APIError:
    if isinstance(err, ShuttingDown):
        return APIError(503, str(err), "server_error", None, "shutting_down")
    log.error("generation failed: %r", err)
    return APIError(500, f"generation failed: {type(err).__name__}", "server_error", None, None)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               max_connections: int | None = None) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                timeout_graceful_shutdown=5, server_header=False)
