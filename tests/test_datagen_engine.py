"""The request engine against a real HTTP server on 127.0.0.1, through the real `openai` client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply, client_error, malformed, rate_limited, server_error

from vitune.datagen.engine import (
    ChatRequest,
    EngineConfig,
    EngineStats,
    cache_key,
    estimate_requests,
    parse_retry_after,
    run_chat_requests,
)
from vitune.errors import VituneError


@pytest.fixture()
def server():
    with FakeOpenAI(reply=lambda body: f"answer to {body['messages'][-1]['content']}") as s:
        yield s


def config(server: FakeOpenAI, tmp_path: Path | None = None, **kw) -> EngineConfig:
    base = dict(
        base_url=server.base_url,
        model="fake-model",
        api_key_env="VITUNE_TEST_NO_SUCH_KEY",
        concurrency=4,
        max_retries=3,
        timeout_s=5.0,
        backoff_base_s=0.01,
        cache_dir=tmp_path / "cache" if tmp_path else None,
    )
    base.update(kw)
    return EngineConfig(**base)


def reqs(n: int, prefix: str = "q") -> list[ChatRequest]:
    return [ChatRequest(key=f"{prefix}{i}", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(n)]


def test_results_in_request_order_with_usage_and_cost(server, tmp_path):
    stats = EngineStats()
    cfg = config(server, tmp_path, price_per_1k_input=1.0, price_per_1k_output=2.0)
    results = run_chat_requests(reqs(6), cfg, progress=False, stats=stats)
    assert [r.key for r in results] == [f"q{i}" for i in range(6)]
    assert [r.text for r in results] == [f"answer to question {i}" for i in range(6)]
    # the fake counts whitespace words: 2 prompt words, 4 completion words per request
    assert all(r.prompt_tokens == 2 and r.completion_tokens == 4 and not r.cached for r in results)
    assert stats.cost == pytest.approx(6 * (2 / 1000 * 1.0 + 4 / 1000 * 2.0))
    assert server.request_count == 6
    sent = server.completion_requests()[0].body
    assert sent["model"] == "fake-model" and sent["max_tokens"] == 1024 and sent["temperature"] == 0.2


def test_second_run_makes_zero_requests(server, tmp_path):
    cfg = config(server, tmp_path)
    first = run_chat_requests(reqs(5), cfg, progress=False)
    assert server.request_count == 5
    server.reset()
    second = run_chat_requests(reqs(5), cfg, progress=False)
    assert server.request_count == 0
    assert [r.text for r in second] == [r.text for r in first]
    assert all(r.cached for r in second)
    assert [r.created for r in second] == [r.created for r in first]


def test_cache_key_depends_on_content_not_caller_key(server, tmp_path):
    cfg = config(server, tmp_path)
    a = ChatRequest("a", [{"role": "user", "content": "x"}])
    assert cache_key(a, cfg) == cache_key(ChatRequest("b", [{"role": "user", "content": "x"}]), cfg)
    assert cache_key(a, cfg) != cache_key(ChatRequest("a", [{"role": "user", "content": "x"}], temperature=0.7), cfg)
    assert cache_key(a, cfg) != cache_key(a, config(server, tmp_path, model="other"))
    assert cache_key(a, cfg) != cache_key(a, config(server, tmp_path, prompt_version="v2"))
    assert cache_key(a, cfg) != cache_key(ChatRequest("a", [{"role": "user", "content": "x"}], seed=1), cfg)


def test_identical_requests_in_one_run_are_sent_once(server, tmp_path):
    same = [ChatRequest(f"k{i}", [{"role": "user", "content": "same"}]) for i in range(4)]
    results = run_chat_requests(same, config(server, tmp_path), progress=False)
    assert server.request_count == 1
    assert [r.key for r in results] == ["k0", "k1", "k2", "k3"]
    assert len({r.text for r in results}) == 1


def test_retry_after_is_honoured(server, tmp_path):
    server.enqueue(rate_limited(retry_after=0.6))
    results = run_chat_requests(reqs(1), config(server, tmp_path, concurrency=1), progress=False)
    assert results[0].text == "answer to question 0" and results[0].attempts == 2
    times = [r.time for r in server.completion_requests()]
    assert len(times) == 2
    assert times[1] - times[0] >= 0.6  # backoff_base_s is 0.01: only retry-after explains the wait


def test_retry_after_pauses_other_workers(server, tmp_path):
    server.enqueue(rate_limited(retry_after=0.5))
    server.set_reply(lambda body: Reply("ok", delay=0.05))
    run_chat_requests(reqs(4), config(server, tmp_path, concurrency=1), progress=False)
    times = [r.time for r in server.completion_requests()]
    assert len(times) == 5
    assert min(times[1:]) - times[0] >= 0.5


def test_server_errors_and_malformed_bodies_are_retried(server, tmp_path):
    server.enqueue(server_error(500), malformed(), server_error(503))
    stats = EngineStats()
    results = run_chat_requests(reqs(1), config(server, tmp_path, concurrency=1), progress=False, stats=stats)
    assert results[0].text == "answer to question 0"
    assert server.request_count == 4 and stats.retries == 3


def test_gives_up_after_max_retries_and_reports(server, tmp_path):
    server.set_reply(lambda body: server_error(500))
    stats = EngineStats()
    results = run_chat_requests(reqs(2), config(server, tmp_path, max_retries=2), progress=False, stats=stats)
    assert all(r.text is None and "500" in r.error for r in results)
    assert server.request_count == 6 and stats.failed == 2
    # failures are not cached: a later run asks again
    server.set_reply(lambda body: "fine")
    assert [r.text for r in run_chat_requests(reqs(2), config(server, tmp_path), progress=False)] == ["fine", "fine"]


def test_client_errors_are_not_retried(server, tmp_path):
    server.enqueue(client_error(400, "bad model name"))
    results = run_chat_requests(reqs(1), config(server, tmp_path, concurrency=1), progress=False)
    assert server.request_count == 1
    assert results[0].text is None and "400" in results[0].error and "bad model name" in results[0].error


def test_timeouts_are_retried(server, tmp_path):
    server.enqueue(Reply("too late", delay=3.0))
    results = run_chat_requests(reqs(1), config(server, tmp_path, concurrency=1, timeout_s=1.0), progress=False)
    assert results[0].text == "answer to question 0" and results[0].attempts == 2


def test_budget_stop_holds(server, tmp_path):
    # each reply costs 2 prompt + 4 completion tokens; the worst case reserved is max_tokens=50
    cfg = config(
        server, tmp_path, concurrency=2, price_per_1k_input=10.0, price_per_1k_output=10.0, max_cost=2.0
    )
    requests = [ChatRequest(f"q{i}", [{"role": "user", "content": f"question {i}"}], max_tokens=50) for i in range(200)]
    stats = EngineStats()
    results = run_chat_requests(requests, cfg, progress=False, stats=stats)
    done = [r for r in results if r.text is not None]
    stopped = [r for r in results if r.error and r.error.startswith("budget")]
    assert done and stopped and len(done) + len(stopped) == 200
    assert stats.cost <= 2.0
    assert sum(r.cost for r in done) == pytest.approx(stats.cost)
    assert server.request_count == len(done)
    # it stopped because the worst case (about 11 prompt tokens + 50 output tokens, $0.61) of the
    # next request, on top of those in flight, no longer fitted, not earlier
    assert stats.cost > 2.0 - 2 * 0.61


def test_cost_limit_needs_prices(server):
    with pytest.raises(VituneError, match="prices"):
        run_chat_requests(reqs(1), config(server, max_cost=1.0), progress=False)


def test_rpm_paces_requests(server, tmp_path):
    # 20 requests a second with a bucket of one second: 30 requests, all workers ready at once, cannot
    # all be sent before (30 - 20) / 20 = 0.5 s have passed
    start = time.monotonic()
    run_chat_requests(reqs(30), config(server, tmp_path, rpm=1200, concurrency=30), progress=False)
    assert time.monotonic() - start >= 0.5
    assert server.request_count == 30


def test_missing_api_key_without_base_url_is_a_clear_error(tmp_path):
    cfg = EngineConfig(api_key_env="VITUNE_TEST_NO_SUCH_KEY", cache_dir=tmp_path)
    with pytest.raises(VituneError, match="VITUNE_TEST_NO_SUCH_KEY"):
        run_chat_requests(reqs(1), cfg, progress=False)


def test_duplicate_keys_rejected(server):
    with pytest.raises(VituneError, match="unique"):
        run_chat_requests(reqs(2) + reqs(1), config(server), progress=False)


def test_dry_run_estimate_counts_cache(server, tmp_path):
    cfg = config(server, tmp_path, price_per_1k_input=1.0, price_per_1k_output=1.0)
    run_chat_requests(reqs(2), cfg, progress=False)
    est = estimate_requests(reqs(5), cfg)
    assert est.requests == 5 and est.cached == 2
    assert est.max_completion_tokens == 3 * 1024
    assert 0 < est.cost_min < est.cost_max
    assert server.request_count == 2


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({}) is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after({"retry-after": http_date}) <= 31


def test_connection_errors_are_retried_then_reported(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = EngineConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_env="VITUNE_TEST_NO_SUCH_KEY",
                       max_retries=2, backoff_base_s=0.01, timeout_s=2.0)
    stats = EngineStats()
    results = run_chat_requests(reqs(1), cfg, progress=False, stats=stats)
    assert results[0].text is None and results[0].error.startswith("connection error")
    assert results[0].attempts == 3 and stats.retries == 2
