"""OpenAI Batch API files: write the input JSONL, ingest the output JSONL into the engine's cache.

Batch mode is the cheap, slow path: `write_batch_input` writes one line per request that is not
cached yet, `{"custom_id": KEY, "method": "POST", "url": "/v1/chat/completions", "body": {...}}`;
the user uploads it (`openai` CLI or dashboard) and downloads the output file when the batch is
done; `ingest_batch_output` stores every successful answer in the same content-addressed cache the
live engine uses, so the normal run then finds all of them cached and builds the data set exactly
as if they had been fetched live.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vitune.io import atomic_write_jsonl
from vitune.datagen.engine import ChatRequest, EngineConfig, ResponseCache, cache_key, price
from vitune.errors import VituneError

BATCH_URL = "/v1/chat/completions"


def batch_line(request: ChatRequest, config: EngineConfig) -> dict:
    body: dict = {
        "model": config.model,
        "messages": request.messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    return {"custom_id": request.key, "method": "POST", "url": BATCH_URL, "body": body}


def write_batch_input(requests: Sequence[ChatRequest], config: EngineConfig, path: str | Path,
                      skip_cached: bool = True) -> int:
    """Write the Batch API input file (atomically); returns how many requests it holds."""
    cache = ResponseCache(config.cache_dir)
    seen: set[str] = set()
    lines = []
    for req in requests:
        digest = cache_key(req, config)
        if digest in seen or (skip_cached and cache.get(digest) is not None):
            continue
        seen.add(digest)
        lines.append(batch_line(req, config))
    return atomic_write_jsonl(path, lines)


@dataclass
class IngestReport:
    stored: int = 0
    errors: Counter = field(default_factory=Counter)  # reason -> count
    unknown_ids: list[str] = field(default_factory=list)  # custom_ids not among the requests
    missing: list[str] = field(default_factory=list)  # requests neither cached nor in the file
    cost: float = 0.0


def ingest_batch_output(path: str | Path, requests: Sequence[ChatRequest], config: EngineConfig) -> IngestReport:
    """Store the successful answers of a Batch API output file in the cache."""
    if config.cache_dir is None:
        raise VituneError("ingesting a batch output needs a cache directory")
    path = Path(path)
    by_key = {r.key: r for r in requests}
    cache = ResponseCache(config.cache_dir)
    report = IngestReport()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise VituneError(f"batch output file not found: {path}") from err
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise VituneError(f"{where}: not valid JSON ({err.msg})") from err
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str):
            raise VituneError(f"{where}: missing field 'custom_id'")
        req = by_key.get(custom_id)
        if req is None:
            report.unknown_ids.append(custom_id)
            continue
        if record.get("error"):
            err = record["error"]
            report.errors[str(err.get("code", "error")) if isinstance(err, dict) else "error"] += 1
            continue
        response = record.get("response") or {}
        status = response.get("status_code")
        if status != 200:
            report.errors[f"http_{status}"] += 1
            continue
        body = response.get("body") or {}
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            report.errors["malformed"] += 1
            continue
        usage = body.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0) or 0)
        completion_tokens = int(usage.get("completion_tokens", 0) or 0)
        report.cost += price(config, prompt_tokens, completion_tokens)
        cache.put(
            cache_key(req, config),
            {
                "text": text,
                "finish_reason": choice.get("finish_reason"),
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "model": config.model,
                "response_model": body.get("model"),
                "prompt_version": config.prompt_version,
                "created": float(body.get("created") or time.time()),
                "request": {"messages": req.messages, "temperature": req.temperature,
                            "max_tokens": req.max_tokens, "seed": req.seed},
                "batch": {"file": str(path), "id": record.get("id")},
            },
        )
        report.stored += 1
    report.missing = [r.key for r in requests if cache.get(cache_key(r, config)) is None]
    return report
