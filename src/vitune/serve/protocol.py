"""The OpenAI chat-completions wire format: request validation, image URLs, responses, errors.

Everything a client can send is checked here, before any work is queued, and every problem becomes
an `APIError` carrying the HTTP status and the OpenAI error shape
`{"error": {"message", "type", "param", "code"}}`, with `param` naming the offending field
(`messages[2].content[1].image_url`). Images come only from `data:` URLs (or, when the operator
allows it, http(s) URLs fetched with size and time limits); a path or `file:` URL is never read.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from vitune.errors import VituneError
from vitune.generation import SamplingParams
from vitune.images import load_image


@dataclass
class Limits:
    """Per-request safety limits (all configurable from `vitune serve`)."""

    max_request_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 12_000_000
    max_images: int = 8
    max_new_tokens: int = 2048
    max_stop_strings: int = 4
    remote_image_timeout_s: float = 10.0
    allow_remote_images: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class ChatRequest:
    """A validated request: messages in OpenAI form with `<image>` parts, the decoded images in order."""

    model: str | None
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    params: SamplingParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    return obj


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)[:50]}", param=name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)[:50]}", param=name)
    if value < lo or (hi is not None and value > hi):
        upper = f" and at most {hi}" if hi is not None else ""
        raise bad_request(f"'{name}' must be at least {lo}{upper}, got {value}", param=name)
    return value


def parse_chat_request(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """Validate a /v1/chat/completions body and decode its images (raises APIError)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", param="n")
    if body.get("logprobs") not in (None, False) or body.get("tools") or body.get("functions"):
        name = "logprobs" if body.get("logprobs") not in (None, False) else "tools"
        raise bad_request(f"'{name}' is not supported by this server", param=name)

    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    image_parts = _count_image_parts(raw)
    if image_parts > limits.max_images:
        raise bad_request(f"the request has {image_parts} images; this server accepts at most {limits.max_images} per request",
                          param="messages", code="too_many_images")
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = _ROLES.get(msg.get("role")) if isinstance(msg.get("role"), str) else None
        if role is None:
            raise bad_request(f"{where}.role must be one of system, developer, user, assistant; got {json.dumps(msg.get('role'))[:40]}",
                              param=f"{where}.role")
        content = msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": _text(content, f"{where}.content")})
        elif isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise bad_request(f"{pwhere}.text must be a string", param=f"{pwhere}.text")
                    parts.append({"type": "text", "text": _text(text, f"{pwhere}.text")})
                elif kind == "image_url":
                    if role != "user":
                        raise bad_request(f"{pwhere}: images are only accepted in user messages", param=pwhere)
                    images.append(decode_image_url(part.get("image_url"), f"{pwhere}.image_url", limits))
                    parts.append({"type": "image"})
                else:
                    raise bad_request(f"{pwhere}.type must be 'text' or 'image_url', got {json.dumps(kind)[:40]}", param=f"{pwhere}.type")
            messages.append({"role": role, "content": parts})
        else:
            raise bad_request(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be from the user", param=f"messages[{len(messages) - 1}].role")

    max_tokens = _integer(body, "max_completion_tokens", 1, limits.max_new_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, limits.max_new_tokens)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:  # keep only the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    top_k = _integer(body, "top_k", 0) or 0
    repetition_penalty = _number(body, "repetition_penalty", 0.01, 10.0, 1.0)
    seed = _integer(body, "seed", -(2**63))
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad_request("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > limits.max_stop_strings:
        raise bad_request(f"'stop' has {len(stops)} strings; at most {limits.max_stop_strings} are allowed", param="stop")
    if any(not s for s in stops):
        raise bad_request("'stop' strings must not be empty", param="stop")
    stops = tuple(_text(s, "stop") for s in stops)

    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage", False))

    params = SamplingParams(
        max_new_tokens=max_tokens or limits.max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=None if seed is None else seed % 2**63, stop=stops,
    )
    return ChatRequest(model, messages, images, params, max_tokens is not None, bool(stream), include_usage)


def _text(value: str, where: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} is not valid Unicode (it contains a lone surrogate)", param=where) from None
    return value


def _count_image_parts(messages: list[Any]) -> int:
    count = 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            count += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
    return count


def decode_image_url(value: Any, where: str, limits: Limits) -> Image.Image:
    """An `image_url` part's image: a data: URL, or an http(s) URL when the operator allows it."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.url must be a non-empty string", param=f"{where}.url")
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None or not m.group("b64"):
            raise bad_request(f"{where}: a data URL must look like data:image/png;base64,<data>", param=where, code="invalid_image_url")
        try:
            data = base64.b64decode(m.group("data"), validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad_request(f"{where}: the data URL is not valid base64 ({err})", param=where, code="invalid_base64") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise bad_request(f"{where}: remote image URLs are disabled on this server; send the image inline as a data: URL "
                              "(the operator can allow them with --allow-remote-images)", param=where, code="remote_images_disabled")
        data = fetch_remote_image(url, where, limits)
    else:
        raise bad_request(f"{where}: only data: URLs (and http(s) URLs where enabled) are accepted; this server never reads its own files",
                          param=where, code="invalid_image_url")
    if not data:
        raise bad_request(f"{where}: the image is empty", param=where, code="invalid_image")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels, where=where)
    except VituneError as err:
        raise bad_request(str(err), param=where, code="invalid_image") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds of errors on hostile input
        raise bad_request(f"{where}: not a decodable image ({type(err).__name__}: {err})", param=where, code="invalid_image") from None


def fetch_remote_image(url: str, where: str, limits: Limits) -> bytes:
    """GET an image with a size cap and a timeout, refusing loopback / private / link-local hosts so
    an allowed remote fetch still cannot reach the server's internal network."""
    import httpx

    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as err:
        raise bad_request(f"{where}: cannot resolve {host!r} ({err})", param=where, code="invalid_image_url") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise bad_request(f"{where}: {host!r} resolves to a non-public address; refused", param=where, code="invalid_image_url")
    chunks: list[bytes] = []
    size = 0
    try:
        with httpx.stream("GET", url, timeout=limits.remote_image_timeout_s, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise bad_request(f"{where}: fetching the image returned HTTP {resp.status_code}", param=where, code="invalid_image_url")
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > limits.max_request_bytes:
                    raise bad_request(f"{where}: the remote image is larger than {limits.max_request_bytes} bytes", param=where, code="invalid_image")
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise bad_request(f"{where}: could not fetch the image ({err})", param=where, code="invalid_image_url") from None
    return b"".join(chunks)


# -- responses -------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None,
               include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if include_usage:
        body["usage"] = None  # as OpenAI: null on every chunk but the last
    return body


def usage_chunk(cid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
