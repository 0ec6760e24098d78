"""The request engine: many chat-completion requests to an OpenAI-compatible endpoint, safely.

It owns everything between "a list of prompts" and "a list of answers" that costs money:
- bounded concurrency, and requests-per-minute / tokens-per-minute token buckets;
- retries with exponential backoff and full jitter on 429, 5xx, timeouts, connection errors and
  malformed bodies, honouring `retry-after` (a 429 pauses every worker, not only the one that got
  it); other 4xx are reported, not retried. The `openai` client's own retries are off so this is
  the one policy;
- a content-addressed disk cache keyed by (model, prompt version, messages, temperature,
  max tokens, seed): one JSON file per answer, written atomically the moment it arrives, so a
  rerun pays nothing and a killed run loses only the requests in flight. Identical requests in
  one run are sent once;
- usage accounting from the responses and a cost from the user's prices; `max_cost` reserves each
  request's worst case (estimated prompt + `max_tokens` of output) before sending, so the budget
  is not exceeded, and stops launching new requests when the next one might exceed it;
- a progress bar with the running cost and ETA.

`run_chat_requests` is the synchronous entry point (the data generator and the LLM judge use it);
`estimate_requests` is the dry run.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitune.errors import VituneError
from vitune.io import atomic_write_json

CACHE_FORMAT = 1


@dataclass(frozen=True)
class ChatRequest:
    key: str  # caller's unique id for the request (e.g. "q12/run0"); results come back in request order
    messages: list[dict]  # OpenAI chat messages
    temperature: float = 0.2
    max_tokens: int = 1024
    seed: int | None = None  # sent to the API when set, and part of the cache key (repeat samples)


@dataclass
class ChatResult:
    key: str
    text: str | None
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None = None
    cost: float = 0.0  # what this run paid for it (0 when cached)
    created: float | None = None  # when the answer was first received (kept in the cache)
    attempts: int = 0


@dataclass
class EngineConfig:
    base_url: str | None = None
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    rpm: int | None = None
    tpm: int | None = None
    max_retries: int = 6
    timeout_s: float = 120.0
    cache_dir: Path | None = None
    prompt_version: str = ""
    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None
    max_cost: float | None = None
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    chars_per_token: float = 3.0  # starting guess for prompt-token estimates; refined from usage
    offline: bool = False  # answer from the cache only (after a batch ingest): nothing is sent


@dataclass
class EngineStats:
    requests: int = 0  # distinct requests asked for
    cache_hits: int = 0
    sent: int = 0  # HTTP attempts made
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped_budget: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    errors: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "errors"}
        out["cost"] = round(self.cost, 6)
        out["errors"] = dict(self.errors)
        return out


@dataclass(frozen=True)
class Estimate:
    requests: int
    cached: int
    prompt_tokens: int  # estimated, uncached requests only
    max_completion_tokens: int  # upper bound: sum of max_tokens of uncached requests
    cost_min: float | None  # prompt tokens only
    cost_max: float | None  # prompt tokens plus every max_tokens


# -- cache ---------------------------------------------------------------------------------------


def cache_key(request: ChatRequest, config: EngineConfig) -> str:
    """Content address of a request: what the answer depends on, nothing else (not the caller's key)."""
    payload = {
        "format": CACHE_FORMAT,
        "model": config.model,
        "prompt_version": config.prompt_version,
        "messages": request.messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "seed": request.seed,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """One JSON file per answer under `root/ab/abcdef....json`; absent root = no cache."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _path(self, digest: str) -> Path:
        assert self.root is not None
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, digest: str) -> dict | None:
        if self.root is None:
            return None
        path = self._path(digest)
        try:
            with path.open(encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn file cannot exist (atomic writes), but a hand-edited one can: refetch
        return entry if isinstance(entry, dict) and isinstance(entry.get("text"), str) else None

    def put(self, digest: str, entry: dict) -> None:
        if self.root is not None:
            atomic_write_json(self._path(digest), entry, indent=None)


# -- estimates and prices ------------------------------------------------------------------------


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0


def estimate_prompt_tokens(messages: Sequence[dict], chars_per_token: float = 3.0) -> int:
    """A deliberately generous prompt-token estimate (chat formatting adds ~4 tokens a message)."""
    return 3 + sum(4 + math.ceil(_content_chars(m.get("content")) / chars_per_token) for m in messages)


def price(config: EngineConfig, prompt_tokens: int, completion_tokens: int) -> float:
    if config.price_per_1k_input is None or config.price_per_1k_output is None:
        return 0.0
    return prompt_tokens / 1000 * config.price_per_1k_input + completion_tokens / 1000 * config.price_per_1k_output


def _check_prices(config: EngineConfig) -> None:
    if config.max_cost is not None and (config.price_per_1k_input is None or config.price_per_1k_output is None):
        raise VituneError("a cost limit needs both prices (per 1k input tokens and per 1k output tokens)")


def estimate_requests(requests: Sequence[ChatRequest], config: EngineConfig) -> Estimate:
    """The dry run: how many requests would be sent, their estimated tokens and cost range."""
    cache = ResponseCache(config.cache_dir)
    seen: set[str] = set()
    cached = prompt = completion = 0
    for req in requests:
        digest = cache_key(req, config)
        if digest in seen:
            continue
        seen.add(digest)
        if cache.get(digest) is not None:
            cached += 1
            continue
        prompt += estimate_prompt_tokens(req.messages, config.chars_per_token)
        completion += req.max_tokens
    priced = config.price_per_1k_input is not None and config.price_per_1k_output is not None
    return Estimate(
        requests=len(seen),
        cached=cached,
        prompt_tokens=prompt,
        max_completion_tokens=completion,
        cost_min=price(config, prompt, 0) if priced else None,
        cost_max=price(config, prompt, completion) if priced else None,
    )


# -- rate limits ---------------------------------------------------------------------------------


class TokenBucket:
    """`rate_per_minute` units refilled continuously; holds at most one second's worth, so
    requests are paced evenly instead of bursting a minute's allowance at once."""

    def __init__(self, rate_per_minute: float) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        async with self.lock:
            need = min(amount, self.capacity)  # a request bigger than the bucket waits for a full one
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= need:
                    self.level -= amount
                    return
                await asyncio.sleep((need - self.level) / self.rate)


# -- the engine ----------------------------------------------------------------------------------


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` / `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


class BudgetExceeded(Exception):
    pass


class ChatEngine:
    """One run over a list of requests; `stats` holds the accounting afterwards."""

    def __init__(self, config: EngineConfig) -> None:
        _check_prices(config)
        if config.concurrency < 1:
            raise VituneError(f"concurrency must be >= 1, got {config.concurrency}")
        self.config = config
        self.cache = ResponseCache(config.cache_dir)
        self.stats = EngineStats()
        self._chars_per_token = config.chars_per_token
        self._reserved = 0.0
        self._budget_stopped = False
        self._resume_at = 0.0  # monotonic time before which no request is sent (after a 429)
        self._rng = random.Random()

    # public ----------------------------------------------------------------------------------
    def run(self, requests: Sequence[ChatRequest], progress: bool = True) -> list[ChatResult]:
        keys = [r.key for r in requests]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise VituneError(f"request keys must be unique; {dup!r} appears more than once")
        return asyncio.run(self._run(requests, progress))

    # internals -------------------------------------------------------------------------------
    def _client(self) -> Any:
        import openai

        api_key = os.environ.get(self.config.api_key_env)
        if not api_key:
            if self.config.base_url is None:
                raise VituneError(
                    f"no API key: set the environment variable {self.config.api_key_env} "
                    "(or name another one with --api-key-env)"
                )
            api_key = "not-needed"  # local servers (vLLM, Ollama, vitune serve) accept anything
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=self.config.base_url, max_retries=0, timeout=self.config.timeout_s
        )

    async def _run(self, requests: Sequence[ChatRequest], progress: bool) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(cache_key(req, self.config), []).append(i)
        self.stats.requests = len(groups)

        pending: list[tuple[str, list[int]]] = []
        for digest, idx in groups.items():
            entry = self.cache.get(digest)
            if entry is None:
                pending.append((digest, idx))
                continue
            self.stats.cache_hits += 1
            for i in idx:
                results[i] = ChatResult(
                    key=requests[i].key,
                    text=entry["text"],
                    error=None,
                    prompt_tokens=int(entry.get("prompt_tokens", 0)),
                    completion_tokens=int(entry.get("completion_tokens", 0)),
                    cached=True,
                    finish_reason=entry.get("finish_reason"),
                    created=entry.get("created"),
                )

        if self.config.offline:
            for _, idx in pending:
                for i in idx:
                    results[i] = ChatResult(requests[i].key, None, "not cached (offline: nothing is sent)", 0, 0, False)
            self.stats.errors["not_cached"] += len(pending)
            self.stats.failed += len(pending)
            pending = []
        bar = None
        if progress and pending:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc=f"teacher {self.config.model}", unit="req", dynamic_ncols=True)
        if pending:
            client = self._client()
            semaphore = asyncio.Semaphore(self.config.concurrency)
            rpm = TokenBucket(self.config.rpm) if self.config.rpm else None
            tpm = TokenBucket(self.config.tpm) if self.config.tpm else None

            async def worker(digest: str, idx: list[int]) -> None:
                async with semaphore:
                    result = await self._one(client, requests[idx[0]], digest, rpm, tpm)
                for i in idx:
                    results[i] = ChatResult(**{**result.__dict__, "key": requests[i].key})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(cost=f"${self.stats.cost:.4f}", failed=self.stats.failed, refresh=False)

            try:
                await asyncio.gather(*(worker(d, idx) for d, idx in pending))
            finally:
                if bar is not None:
                    bar.close()
                await client.close()
        return [r for r in results if r is not None]

    def _estimate_cost(self, req: ChatRequest) -> tuple[int, float]:
        tokens = estimate_prompt_tokens(req.messages, self._chars_per_token)
        return tokens, price(self.config, tokens, req.max_tokens)

    def _reserve(self, cost: float) -> bool:
        """Claim `cost` of the budget for a request about to be sent; False once it would not fit."""
        if self.config.max_cost is None:
            return True
        if self._budget_stopped or self.stats.cost + self._reserved + cost > self.config.max_cost:
            self._budget_stopped = True  # stop launching: later requests are answered "budget"
            return False
        self._reserved += cost
        return True

    def _learn_token_ratio(self, req: ChatRequest, prompt_tokens: int) -> None:
        chars = sum(_content_chars(m.get("content")) for m in req.messages)
        if prompt_tokens > 0 and chars > 0:
            # keep the most token-dense ratio seen (x0.9): estimates stay on the generous side
            self._chars_per_token = min(self._chars_per_token, 0.9 * chars / prompt_tokens)

    async def _wait_backoff(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = retry_after + self._rng.uniform(0, 0.1 * self.config.backoff_base_s)
            self._resume_at = max(self._resume_at, time.monotonic() + retry_after)
        else:
            cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
            delay = self._rng.uniform(cap / 2, cap)
        await asyncio.sleep(delay)

    async def _one(
        self, client: Any, req: ChatRequest, digest: str, rpm: TokenBucket | None, tpm: TokenBucket | None
    ) -> ChatResult:
        est_tokens, est_cost = self._estimate_cost(req)
        if not self._reserve(est_cost):
            self.stats.skipped_budget += 1
            self.stats.errors["budget"] += 1
            return ChatResult(req.key, None, "budget: max cost reached before this request", 0, 0, False)
        try:
            return await self._attempts(client, req, digest, est_tokens, rpm, tpm)
        finally:
            if self.config.max_cost is not None:
                self._reserved -= est_cost

    async def _attempts(
        self,
        client: Any,
        req: ChatRequest,
        digest: str,
        est_tokens: int,
        rpm: TokenBucket | None,
        tpm: TokenBucket | None,
    ) -> ChatResult:
        import openai

        attempt = 0
        while True:
            wait = self._resume_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if rpm is not None:
                await rpm.take(1)
            if tpm is not None:
                await tpm.take(est_tokens + req.max_tokens)
            self.stats.sent += 1
            try:
                kwargs: dict[str, Any] = {
                    "model": self.config.model,
                    "messages": req.messages,
                    "temperature": req.temperature,
                    "max_tokens": req.max_tokens,
                }
                if req.seed is not None:
                    kwargs["seed"] = req.seed
                try:
                    response = await client.chat.completions.create(**kwargs)
                except openai.RateLimitError as err:
                    raise _Retryable("429 rate limited", parse_retry_after(err.response.headers)) from err
                except openai.InternalServerError as err:
                    raise _Retryable(f"{err.status_code} server error", parse_retry_after(err.response.headers)) from err
                except openai.APIStatusError as err:
                    if err.status_code in (408, 409):  # request timeout / conflict: transient by definition
                        raise _Retryable(f"{err.status_code}", parse_retry_after(err.response.headers)) from err
                    raise
                except openai.APITimeoutError as err:
                    raise _Retryable("timeout") from err
                except openai.APIConnectionError as err:
                    raise _Retryable("connection error") from err
                except (ValueError, openai.APIResponseValidationError) as err:
                    raise _Retryable("malformed response") from err
                choices = getattr(response, "choices", None)
                if not choices or getattr(choices[0], "message", None) is None:
                    raise _Retryable("malformed response")
            except _Retryable as err:
                if attempt >= self.config.max_retries:
                    self.stats.failed += 1
                    self.stats.errors[err.reason.split()[0] if err.reason[0].isdigit() else err.reason] += 1
                    return ChatResult(
                        req.key, None, f"{err.reason} (gave up after {attempt + 1} attempts)", 0, 0, False, attempts=attempt + 1
                    )
                attempt += 1
                self.stats.retries += 1
                await self._wait_backoff(attempt, err.retry_after)
                continue
            except openai.APIStatusError as err:
                self.stats.failed += 1
                self.stats.errors[str(err.status_code)] += 1
                return ChatResult(req.key, None, f"HTTP {err.status_code}: {err.message}", 0, 0, False, attempts=attempt + 1)

            usage = getattr(response, "usage", None)
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            text = choices[0].message.content or ""
            finish = choices[0].finish_reason
            cost = price(self.config, prompt_tokens, completion_tokens)
            created = time.time()
            self._learn_token_ratio(req, prompt_tokens)
            self.stats.succeeded += 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self.stats.cost += cost
            self.cache.put(
                digest,
                {
                    "text": text,
                    "finish_reason": finish,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "model": self.config.model,
                    "response_model": getattr(response, "model", None),
                    "prompt_version": self.config.prompt_version,
                    "created": created,
                    "request": {"messages": req.messages, "temperature": req.temperature, "max_tokens": req.max_tokens, "seed": req.seed},
                },
            )
            return ChatResult(
                req.key, text, None, prompt_tokens, completion_tokens, False, finish, cost, created, attempt + 1
            )


def run_chat_requests(
    requests: Sequence[ChatRequest], config: EngineConfig, progress: bool = True, stats: EngineStats | None = None
) -> list[ChatResult]:
    """Answer every request (from the cache where possible), in request order.

    Failed requests come back with `text=None` and `error` set ("budget: ..." for those not sent
    because of `max_cost`). Pass an `EngineStats` to receive the run's accounting."""
    engine = ChatEngine(config)
    results = engine.run(requests, progress=progress)
    if stats is not None:
        stats.__dict__.update(engine.stats.__dict__)
    return results
