"""The API server with the real `openai` client against live uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from vitune.inference import GenerationRequest, Pipeline, SamplingParams
from vitune.serve.app import ServeConfig, create_app
from vitune.serve.live import live_server
from vitune.serve.protocol import Limits

KEY = "sk-test-key"
NAME = "tiny-llava"


def png_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def red() -> Image.Image:
    return Image.new("RGB", (20, 30), (200, 10, 10))


def blue() -> Image.Image:
    im = Image.new("RGB", (24, 24), (10, 10, 220))
    im.paste((250, 250, 0), (4, 4, 12, 12))
    return im


def user_with_image(text: str, image: Image.Image) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(image)}}, {"type": "text", "text": text}]}


def local(pipe: Pipeline, messages: list[dict[str, Any]], images: list[Image.Image], max_new_tokens: int, **kw: Any):
    """What the model answers one request at a time, without the server (the reference)."""
    conv = []
    for m in messages:
        c = m["content"]
        conv.append({"role": m["role"], "content": c if isinstance(c, str) else
                     [{"type": "image"} if p["type"] == "image_url" else p for p in c]})
    req = GenerationRequest(conv, images, SamplingParams(max_new_tokens=max_new_tokens, **kw))
    return pipe.generate([req])[0]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


LIMITS = Limits(max_request_bytes=512 * 1024, max_image_pixels=1_000_000, max_images=2, max_new_tokens=64)


@pytest.fixture(scope="module")
def server(pipe: Pipeline) -> Iterator[tuple[str, Any]]:
    app = create_app(pipe, ServeConfig(NAME, api_key=KEY, limits=LIMITS, max_batch_size=16, batch_wait_s=0.05, web=False))
    with live_server(app) as url:
        yield url, app.state.server


@pytest.fixture
def client(server: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_health_and_auth(server: tuple[str, Any], client: openai.OpenAI) -> None:
    url, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(url + "/health")  # open without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/openapi.json").status_code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    nokey = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert nokey.status_code == 401 and "missing API key" in nokey.json()["error"]["message"]


def test_completion_with_image_matches_local_generation(client: openai.OpenAI, pipe: Pipeline) -> None:
    messages = [user_with_image("what color is the circle?", red())]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    ref = local(pipe, messages, [red()], 12)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.model == NAME and r.id.startswith("chatcmpl-")
    # prompt_tokens counts the image's placeholder tokens
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert ref.prompt_ids.count(pipe.model.config.image_token_id) == pipe.model.config.num_image_tokens
    text_only = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "what color is the circle?"}],
                                               max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens >= pipe.model.config.num_image_tokens
    assert r.usage.completion_tokens == len(ref.output_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_with_image_and_include_usage(client: openai.OpenAI, server: tuple[str, Any]) -> None:
    messages = [user_with_image("describe the image in detail.", blue())]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the answer should arrive in several pieces"
    assert "".join(deltas) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the raw event stream ends with the [DONE] sentinel
    body = {"model": NAME, "messages": messages, "max_tokens": 4, "stream": True}
    raw = httpx.post(server[0] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).text
    events = [line for line in raw.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client: openai.OpenAI, stream: bool) -> None:
    messages = [user_with_image("how many objects are there?", red())]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0).choices[0].message.content
    assert len(full) > 12
    stop = full[8:11]
    expected = full[: full.find(stop)].rstrip()
    kwargs = dict(model=NAME, messages=messages, max_tokens=40, temperature=0, stop=[stop, "never-seen-zzz"])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert text == expected
    assert stop not in text
    assert finish == "stop"


def test_max_tokens_and_length(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "describe the image in detail."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    if r.usage.completion_tokens == 3:
        assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=LIMITS.max_new_tokens + 1)


def test_multi_turn_with_images_in_earlier_turns(client: openai.OpenAI, pipe: Pipeline) -> None:
    messages = [
        user_with_image("what color is the circle?", red()),
        {"role": "assistant", "content": "the circle is red."},
        user_with_image("and in this one?", blue()),
        {"role": "assistant", "content": "there are three objects."},
        {"role": "user", "content": "how many objects are there?"},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    ref = local(pipe, messages, [red(), blue()], 10)
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert ref.prompt_ids.count(pipe.model.config.image_token_id) == 2 * pipe.model.config.num_image_tokens
    assert r.choices[0].message.content == ref.text


def _error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    err = exc.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_error_cases_map_to_client_exceptions(client: openai.OpenAI, server: tuple[str, Any], tmp_path: Path) -> None:
    url = server[0]

    def ask(content: Any, **kw: Any) -> Any:
        return client.chat.completions.create(model=kw.pop("model", NAME), messages=[{"role": "user", "content": content}], **kw)

    def image_part(u: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": u}}

    cases = {
        "base64": [image_part("data:image/png;base64,@@not*base64@@"), {"type": "text", "text": "hi"}],
        "not a decodable image": [image_part("data:image/png;base64," + base64.b64encode(b"definitely not a png").decode())],
        "at most 2": [image_part(png_url(red()))] * 3 + [{"type": "text", "text": "hi"}],
        "over the limit": [image_part(png_url(Image.new("RGB", (2000, 1000)))), {"type": "text", "text": "bomb?"}],
        "remote image URLs are disabled": [image_part("https://example.com/cat.png")],
        "never reads its own files": [image_part(f"file://{tmp_path}/x.png")],
        "context": "the circle is red. " * 800,
    }
    for expected, content in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            ask(content, max_tokens=4)
        err = _error_of(info.value)
        assert expected in err["message"], (expected, err)
        assert err["type"] == "invalid_request_error"
    # a truncated PNG: the header decodes, the pixels do not
    buf = io.BytesIO()
    blue().save(buf, "PNG")
    truncated = "data:image/png;base64," + base64.b64encode(buf.getvalue()[:60]).decode()
    with pytest.raises(openai.BadRequestError) as info:
        ask([image_part(truncated), {"type": "text", "text": "hi"}])
    assert _error_of(info.value)["param"] == "messages[0].content[0].image_url"
    # a million characters: refused quickly, before tokenizing
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="context"):
        ask("a" * 400_000)
    assert time.monotonic() - t0 < 5
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask("hi", temperature=7)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask("hi", model="gpt-4o")
    with pytest.raises(openai.BadRequestError, match="roles out of order"):
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(openai.BadRequestError, match="<image> markers"):
        ask("look: <image>")
    # bodies the client cannot produce
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/chat/completions", content=b"[1, 2]", headers=auth)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * (LIMITS.max_request_bytes + 1), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(url + "/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and "error" in r.json()


def _probe_requests() -> list[tuple[list[dict[str, Any]], list[Image.Image], dict[str, Any]]]:
    questions = ["what color is the circle?", "how many objects are there?", "describe the image in detail.", "yes or no?"]
    out = []
    for i in range(16):
        image = [red(), blue(), Image.new("RGB", (16 + i, 16), (i * 15, 100, 255 - i * 15))][i % 3]
        q = questions[i % 4] + " " * (i % 3)  # different prompt lengths: left padding in the batch
        if i % 4 == 3:
            out.append(([{"role": "user", "content": q}], [], {"max_tokens": 6 + i}))
        else:
            out.append(([user_with_image(q, image)], [image], {"max_tokens": 6 + i}))
    return out


def test_sixteen_parallel_requests_batched_equal_one_at_a_time(client: openai.OpenAI, server: tuple[str, Any], pipe: Pipeline) -> None:
    srv = server[1]
    batches_before = srv.batcher.stats.batches
    probes = _probe_requests()
    # greedy rows share their batches with sampled ones: per-row params must not leak between rows
    sampled = [([user_with_image("describe the image in detail.", red())], {"temperature": 1.0, "top_p": 0.9, "seed": s}) for s in range(4)]
    barrier = threading.Barrier(len(probes) + len(sampled))

    def one(messages: list[dict[str, Any]], kw: dict[str, Any]) -> Any:
        barrier.wait()
        return client.chat.completions.create(model=NAME, messages=messages, **kw)

    with ThreadPoolExecutor(max_workers=len(probes) + len(sampled)) as pool:
        greedy = [pool.submit(one, m, {**kw, "temperature": 0}) for m, _, kw in probes]
        noisy = [pool.submit(one, m, kw) for m, kw in sampled]
        answers = [f.result() for f in greedy]
        assert all(f.result().choices[0].message.content is not None for f in noisy)
    batches = srv.batcher.stats.batches - batches_before
    assert batches < len(probes) + len(sampled), "requests that arrived together should have shared batches"
    assert srv.batcher.stats.max_batch_seen > 1
    for (messages, images, kw), answer in zip(probes, answers, strict=True):
        ref = local(pipe, messages, images, kw["max_tokens"])
        assert answer.choices[0].message.content == ref.text
        assert answer.usage.completion_tokens == len(ref.output_ids)
        assert answer.usage.prompt_tokens == len(ref.prompt_ids)


def test_batcher_output_ids_equal_one_at_a_time(pipe: Pipeline) -> None:
    """The batcher itself: the token ids of each row equal that request decoded alone."""
    import queue

    from vitune.serve.batcher import Batcher, Job

    batcher = Batcher(pipe.decoder, max_batch_size=8, batch_wait_s=0.2).start()
    try:
        probes = _probe_requests()[:8]
        jobs = []
        for messages, images, kw in probes:
            conv = [{"role": "user", "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]
                     if isinstance(m["content"], list) else m["content"]} for m in messages]
            ids, pixels = pipe.processor.encode_prompt(conv, images)
            q: queue.Queue = queue.Queue()
            jobs.append((batcher.submit(Job(ids, pixels, SamplingParams(max_new_tokens=kw["max_tokens"]), q.put)), q, messages, images, kw))
        for _job, q, messages, images, kw in jobs:
            text, ids_out = "", None
            while ids_out is None:
                event = q.get(timeout=60)
                assert not isinstance(event, BaseException), event
                text += event.text
                if event.finish_reason:
                    ids_out = event.output_ids
            ref = local(pipe, messages, images, kw["max_tokens"])
            assert ids_out == ref.output_ids
            assert text.rstrip() == ref.text
        assert batcher.stats.max_batch_seen == 8
    finally:
        batcher.stop()


class ControlledDecoder:
    """The real decoder, slowed down per step and held at a gate, so tests can fill the queue and
    disconnect mid-answer deterministically."""

    def __init__(self, inner: Any, step_delay_s: float = 0.0) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.step_delay_s = step_delay_s
        self.finishes: list[tuple[str, int]] = []

    def decode_steps(self, prompts, pixel_values, params, cancelled=None):  # noqa: ANN001, ANN201
        self.gate.wait(30)
        for event in self.inner.decode_steps(prompts, pixel_values, params, cancelled):
            if event.finish_reason is not None:
                self.finishes.append((event.finish_reason, len(event.output_ids or [])))
            time.sleep(self.step_delay_s)
            yield event


@pytest.fixture
def controlled(pipe: Pipeline) -> Iterator[tuple[str, ControlledDecoder, Any]]:
    decoder = ControlledDecoder(pipe.decoder)
    fake_pipe = types.SimpleNamespace(processor=pipe.processor, decoder=decoder, context_length=pipe.context_length)
    app = create_app(fake_pipe, ServeConfig(NAME, limits=LIMITS, max_batch_size=1, max_queue=1, batch_wait_s=0.0, retry_after_s=3, web=False))
    with live_server(app) as url:
        yield url, decoder, app.state.server
    decoder.gate.set()


def _wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_503_with_retry_after(controlled: tuple[str, ControlledDecoder, Any]) -> None:
    url, decoder, srv = controlled
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
    decoder.gate.clear()
    messages = [{"role": "user", "content": "what color is the circle?"}]
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.chat.completions.create, model=NAME, messages=messages, max_tokens=4)
        _wait_for(lambda: srv.batcher.running == 1)
        waiting = pool.submit(client.chat.completions.create, model=NAME, messages=messages, max_tokens=4)
        _wait_for(lambda: srv.batcher.queued == 1)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "3"
        assert _error_of(info.value)["code"] == "server_busy"
        decoder.gate.set()
        assert running.result().choices[0].message.content is not None
        assert waiting.result().choices[0].message.content is not None


def test_disconnect_cancels_generation(controlled: tuple[str, ControlledDecoder, Any]) -> None:
    url, decoder, srv = controlled
    decoder.step_delay_s = 0.03
    body = {"model": NAME, "messages": [{"role": "user", "content": "describe the image in detail."}], "max_tokens": 64, "temperature": 0}
    cancelled_before = srv.batcher.stats.jobs_cancelled
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # one real delta arrived: hang up
    _wait_for(lambda: srv.batcher.stats.jobs_cancelled > cancelled_before)
    reason, tokens = decoder.finishes[-1]
    assert reason == "cancelled" and tokens < 64
    # a plain (non-streamed) request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.3)
    _wait_for(lambda: srv.batcher.stats.jobs_cancelled > cancelled_before + 1)
    assert decoder.finishes[-1][0] == "cancelled" and decoder.finishes[-1][1] < 64
    _wait_for(lambda: srv.batcher.running == 0)


def test_remote_images_refuse_internal_addresses(pipe: Pipeline) -> None:
    limits = Limits(allow_remote_images=True, max_new_tokens=8)
    app = create_app(pipe, ServeConfig(NAME, limits=limits, web=False))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        # the server's own address: reachable, and exactly what must not be fetched
        with pytest.raises(openai.BadRequestError, match="non-public address"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url + "/health"}}, {"type": "text", "text": "hi"}]}])


def test_vitune_serve_command(tiny_model_dir: Path) -> None:
    """`vitune serve` as a user runs it: flags parsed, model loaded, uvicorn listening, key enforced."""
    import os
    import signal
    import subprocess
    import sys

    from vitune.serve.live import free_port

    port = free_port()
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitune.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port), "--api-key", KEY,
         "--no-web", "--max-images", "1", "--max-new-tokens", "16", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "vitune serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        model = client.models.list().data[0].id
        assert model == tiny_model_dir.name
        r = client.chat.completions.create(model=model, messages=[user_with_image("what color is the circle?", red())], max_tokens=5)
        assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="at most 1"):
            client.chat.completions.create(model=model, messages=[user_with_image("two?", red()), {"role": "assistant", "content": "x"},
                                                                   user_with_image("and?", blue())])
        with pytest.raises(openai.BadRequestError, match="at most 16"):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=17)
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/").status_code == 401, "with --no-web and a key, nothing but /health is open"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
