"""The API server under attack, on a live loopback server with the tiny model: every route but
`/health` needs the key; hypothesis-generated requests (bodies, raw bytes, paths, headers) never get
a 5xx; decompression bombs, oversized base64, 1,000 images and a million-character prompt are each
answered 4xx quickly with bounded memory (peak RSS growth measured). Full sizes: `make stress`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.bad_inputs.corpus import IMAGES, PeakRSS, data_url, image_part, png_bomb, tiny_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitune.inference import Pipeline
from vitune.serve.app import ServeConfig, create_app
from vitune.serve.live import live_server
from vitune.serve.protocol import Limits

KEY = "sk-reliability-key-0123456789"
NAME = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_request_bytes=2 * 1024 * 1024, max_image_pixels=4_000_000, max_images=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def served(pipe: Pipeline) -> Iterator[tuple[str, Any]]:
    app = create_app(pipe, ServeConfig(NAME, api_key=KEY, limits=LIMITS, max_batch_size=8, batch_wait_s=0.002, web=False))
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def http(served: tuple[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=30) as client:
        yield client


def chat(content: Any, **kw: Any) -> dict[str, Any]:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


# -- authentication ----------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_key(served: tuple[str, Any], http: httpx.Client) -> None:
    from starlette.routing import Route

    url, app = served
    routes = [(r.path, sorted(r.methods or {"GET"})) for r in app.routes if isinstance(r, Route)]
    paths = {p for p, _ in routes}
    assert {"/health", "/v1/models", "/v1/chat/completions", "/openapi.json", "/docs"} <= paths
    wrong_keys = [{}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY[:-1]}"},
                  {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY},
                  {"Authorization": f"Bearer {KEY.upper()}"}, {"X-API-Key": KEY}]
    for path, methods in routes:
        for method in methods:
            if method == "HEAD":
                continue
            if path == "/health":
                assert http.request(method, path).status_code == 200
                continue
            for headers in wrong_keys:
                r = http.request(method, path, headers=headers, content=b"{}")
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert http.request(method, path, headers=AUTH, json=chat("hi")).status_code != 401, (method, path)
    # paths that do not exist are refused before routing: no probing of what is there
    for path in ("/v1/nothing", "/admin", "/../etc/passwd", "/v1/chat/completions/", "/HEALTH", "/health/../v1/models"):
        assert http.get(path).status_code == 401, path
    assert http.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == NAME


def test_key_comparison_is_constant_time_in_the_source() -> None:
    import ast
    import inspect

    from vitune.serve import app as app_module

    tree = ast.parse(inspect.getsource(app_module.APIKeyMiddleware))
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    # no ==/!= on the key anywhere in the middleware
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {ast.unparse(x) for x in (node.left, *node.comparators)}
            assert not any("expected" in n or "given" in n or "token" in n for n in names), ast.unparse(node)


# -- fuzzing: no 5xx for any malformed request ---------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                     max_leaves=12)
_url = st.sampled_from(["data:image/png;base64,", "data:image/png;base64,AAAA", "data:,x", "file:///etc/passwd", "/etc/passwd",
                        "http://127.0.0.1/", "data:image/png;base64," + data_url(tiny_png()).split(",")[1],
                        data_url(png_bomb(5000, 5000, rows=2)), data_url(b"GIF89a" + b"\x00" * 20)]) | st.text(max_size=20)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | _json}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _url}) | _json}),
    _json,
)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]) | _json},
                                 optional={"content": st.text(max_size=40) | st.lists(_part, max_size=3) | _json})
_body = st.fixed_dictionaries({"messages": st.lists(_message, min_size=0, max_size=3) | _json}, optional={
    "model": st.just(NAME) | _json, "max_tokens": st.integers(-2, 6) | _json, "temperature": st.floats(-1, 3, allow_nan=False) | _json,
    "top_p": _json, "top_k": st.integers(-1, 5) | _json, "stop": st.lists(st.text(max_size=3), max_size=5) | _json,
    "seed": st.integers() | _json, "stream": st.booleans() | _json, "stream_options": _json, "n": _json,
    "repetition_penalty": _json, "max_completion_tokens": _json, "logprobs": _json, "tools": _json,
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_body)
def test_fuzzed_json_bodies_never_get_a_5xx(body: dict[str, Any], http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code < 500, (r.status_code, r.text[:300], body)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


_raw = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.sampled_from([b"", b"{", b"[]", b"null", b'"x"', b"1e999999", b'{"messages": 1e400}', b"[" * 5000,
                                  b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b"\xef\xbb\xbf{}",
                                  b'{"a":' * 3000, b'{"messages": [], "messages": [{"role": "user", "content": "x"}]}']))
_headers = st.dictionaries(st.sampled_from(["content-type", "content-encoding", "transfer-encoding-x", "accept", "x-forwarded-for"]),
                           st.sampled_from(["application/json", "text/plain", "gzip", "br", "*/*", "multipart/form-data; boundary=x", "",
                                            "application/json; charset=latin-1"]), max_size=3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=_raw, headers=_headers, method=st.sampled_from(["POST", "PUT", "PATCH", "DELETE", "GET", "OPTIONS"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/models", "/health", "/openapi.json", "/v1/completions", "/"]))
def test_fuzzed_raw_requests_never_get_a_5xx(raw: bytes, headers: dict[str, str], method: str, path: str, http: httpx.Client) -> None:
    r = http.request(method, path, headers={**AUTH, **headers}, content=raw)
    assert r.status_code < 500, (method, path, headers, raw[:100], r.status_code, r.text[:300])


def test_wrong_content_length_and_slow_bodies_are_4xx(served: tuple[str, Any]) -> None:
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(served[0]).hostname, urlsplit(served[0]).port
    for head in (b"Content-Length: abc\r\n", b"Content-Length: -5\r\n", b"Content-Length: 99999999999\r\n"):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n" + head + b"\r\n{}")
            status = s.recv(200).split(b" ", 2)[1]
        assert status.startswith(b"4"), (head, status)


# -- attacks: 4xx, fast, bounded memory -------------------------------------------------------------------
def attack(http: httpx.Client, body: bytes | dict, expect_status: int, expect_code: str | None, max_seconds: float,
           max_mb: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with PeakRSS() as mem:
        r = http.post("/v1/chat/completions", headers={**AUTH, "content-type": "application/json", **(headers or {})}, content=content)
    assert r.status_code == expect_status, (r.status_code, r.text[:300])
    if expect_code is not None:
        assert r.json()["error"]["code"] == expect_code, r.text[:300]
    assert mem.seconds < max_seconds, f"took {mem.seconds:.2f} s"
    assert mem.growth_mb < max_mb, f"memory grew {mem.growth_mb:.0f} MB"
    return {"status": r.status_code, "seconds": round(mem.seconds, 3), "rss_growth_mb": round(mem.growth_mb, 1)}


def test_decompression_bombs_are_refused_from_the_header(http: httpx.Client) -> None:
    # 10^8 pixels in a ~100 KB PNG (a full zlib stream of zeros): refused before any pixel is decoded
    bomb = png_bomb(10_000, 10_000)
    assert len(bomb) < 200_000
    attack(http, chat([image_part(bomb), {"type": "text", "text": "hi"}]), 400, "invalid_image", 3.0, 40)
    # past Pillow's own bomb limit the refusal is still a 400, not a 500
    attack(http, chat([image_part(IMAGES["bomb_30000x30000.png"][0]())]), 400, "invalid_image", 3.0, 40)
    # within the pixel limit but with an extreme aspect ratio: answered, without a 10^8-pixel square
    wide = IMAGES["wide_10000x10.png"][0]()
    attack(http, chat([image_part(wide)] * 4 + [{"type": "text", "text": "hi"}]), 200, None, 10.0, 250)


def test_oversized_bodies_are_refused_while_reading(http: httpx.Client) -> None:
    big = data_url(b"\0" * (3 * LIMITS.max_request_bytes // 4 + 1000))  # base64 past the body limit
    attack(http, chat([{"type": "image_url", "image_url": {"url": big}}]), 413, "request_too_large", 3.0, 60)

    def chunks() -> Iterator[bytes]:  # no content-length: the limit must hold while streaming
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"A" * 65536
        yield b'"}]}'

    with PeakRSS() as mem:
        r = http.post("/v1/chat/completions", headers=AUTH, content=chunks())
    assert r.status_code == 413 and mem.seconds < 5 and mem.growth_mb < 60


def test_a_thousand_images_are_refused_before_decoding(http: httpx.Client) -> None:
    parts = [image_part(tiny_png((i % 250, 0, 0))) for i in range(1000)]
    attack(http, chat(parts), 400, "too_many_images", 3.0, 60)


def test_a_million_character_prompt_is_refused_before_tokenizing(http: httpx.Client) -> None:
    attack(http, chat("the circle is red. " * 55_000), 400, "context_length_exceeded", 3.0, 80)
    # the same characters spread over many messages and parts
    many = {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "a " * 5000}] * 20},
                                        {"role": "assistant", "content": "b " * 50_000}, {"role": "user", "content": "c"}]}
    attack(http, many, 400, "context_length_exceeded", 3.0, 80)


def test_deeply_nested_json_is_a_400(http: httpx.Client) -> None:
    attack(http, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", 3.0, 80)
    attack(http, b'{"messages": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, 400, "invalid_json", 3.0, 80)


def test_server_still_answers_after_the_attacks(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", headers=AUTH, json=chat([image_part(tiny_png()), {"type": "text", "text": "color?"}]))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_with_the_web_demo_nothing_reaches_the_model_without_the_key(pipe: Pipeline) -> None:
    """Mounted with a key, the web demo sits behind its own login (the key as password). A sweep of
    every route without it: the API, the docs, the demo's config, queue, upload, file and run routes
    all answer 401, and the model never runs. (Gradio keeps a few harmless routes open: its login
    form, static files, a heartbeat; they are listed in the failure message if that set grows.)"""
    import re as _re

    from starlette.routing import Mount

    app = create_app(pipe, ServeConfig(NAME, api_key=KEY, limits=LIMITS, web=True))

    def walk(routes: list, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
        for r in routes:
            if isinstance(r, Mount):
                yield from walk(r.routes, prefix + r.path)
            elif hasattr(r, "original_router"):  # FastAPI's lazily included router (gradio's API routes)
                yield from walk(r.original_router.routes, prefix)
            elif hasattr(r, "path"):
                yield prefix + r.path, sorted(getattr(r, "methods", None) or ["GET"])

    guarded = _re.compile(r"^/(v1|docs|redoc|openapi\.json|config|gradio_api/(queue|upload|file|info|api|run|call|predict|"
                          r"component_server|stream|upload_progress))(/|=|$)")
    must_401, opened = [], []  # guarded routes that answered anything but a refusal; routes open without the key
    server = app.state.server
    with live_server(app) as url, httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=1.5)) as http:
        routes = list(walk(app.routes))
        assert sum(1 for p, _ in routes if guarded.match(p)) >= 8, "the guarded routes should be found"
        batches = server.batcher.stats.batches
        for path, methods in routes:
            concrete = _re.sub(r"\{[^}]*\}", "x", path)
            for method in methods:
                if method == "HEAD" or path == "/health":
                    continue
                try:
                    status = http.request(method, concrete, json={"data": ["hi"], "fn_index": 0, "session_hash": "x",
                                                                   "event_id": "x", "trigger_id": 0}).status_code
                except httpx.TimeoutException:
                    status = 0  # a stream held open (gradio's heartbeat)
                if guarded.match(path) and (status == 0 or status < 400):
                    must_401.append((method, path, status))
                if status == 0 or 200 <= status < 300:
                    opened.append((method, path, status))
        assert server.batcher.stats.batches == batches and server.batcher.stats.jobs_done == 0, "the model ran without the key"
    assert not must_401, must_401
    assert all(not guarded.match(p) for _, p, _ in opened), opened
