"""Phase 1 of an evaluation: run a model over a task's questions and log one JSON line per answer.

The answer log (`--out answers.jsonl`) is the run's state: every line is
`{"question_id", "prompt", "text", "model_id", ...task fields}`, flushed as soon as it is
written, and a rerun skips the ids already there, so a killed run resumes where it stopped.
An endpoint's answers are logged one by one as they arrive (a kill loses only the requests in
flight, nothing already paid for); a finished log is put back in question order.
`--shard i/n` answers the i-th of n contiguous slices of the questions (one process per slice,
each with its own `--out`); `merge_answers` joins the shard logs.

Answers come from a vitune model (`PipelineAnswerer`, batched generation, greedy by default) or
from any OpenAI-compatible vision model (`EndpointAnswerer`, the official `openai` client, images
sent as `data:` URLs), so other systems are compared on exactly the same prompts.
"""

from __future__ import annotations

import base64
import mimetypes
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vitune.errors import VituneError
from vitune.eval.io import JsonlLog, read_jsonl
from vitune.io import atomic_write_jsonl

IMAGE_MARKER = "<image>"
RESERVED_FIELDS = frozenset({"question_id", "prompt", "text", "model_id", "error"})


@dataclass(frozen=True)
class EvalItem:
    """One question of a task: the user turn (with one `<image>` marker per image, in order), the
    image files, and the task's fields copied into the answer line (gold answer, category, ...)."""

    question_id: Any
    prompt: str
    images: tuple[Path, ...] = ()
    fields: dict = field(default_factory=dict)
    system: str | None = None

    def __post_init__(self) -> None:
        if self.prompt.count(IMAGE_MARKER) != len(self.images):
            raise VituneError(
                f"question {self.question_id!r}: the prompt has {self.prompt.count(IMAGE_MARKER)} "
                f"{IMAGE_MARKER} marker(s) but {len(self.images)} image(s)"
            )
        clash = RESERVED_FIELDS & set(self.fields)
        if clash:
            raise VituneError(f"question {self.question_id!r}: task fields may not be named {sorted(clash)}")

    def messages(self) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        return [*out, {"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class Answer:
    text: str | None  # None: this question failed (an endpoint error); it is retried on rerun
    error: str | None = None
    meta: dict = field(default_factory=dict)


class Answerer(Protocol):
    name: str
    chunk_size: int  # questions per call of `answer`; each chunk is logged as soon as it is done

    def answer(self, items: Sequence[EvalItem]) -> list[Answer]: ...


def parse_shard(spec: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i_text, n_text = spec.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise VituneError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise VituneError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def shard_items(items: Sequence[EvalItem], shard: tuple[int, int]) -> list[EvalItem]:
    """The i-th of n contiguous, balanced slices (sizes differ by at most one)."""
    i, n = shard
    return list(items[i * len(items) // n : (i + 1) * len(items) // n])


@dataclass
class AnswerRun:
    total: int  # questions in this shard
    skipped: int  # already in the log
    written: int
    failed: list[str]  # "question_id: error"


def answered_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {str(r["question_id"]) for r in read_jsonl(path) if "question_id" in r and "text" in r}


def run_answers(
    items: Sequence[EvalItem],
    answerer: Answerer,
    out: str | Path,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> AnswerRun:
    """Answer the shard's questions not yet in `out`, appending one flushed line per answer."""
    out = Path(out)
    ids = [str(item.question_id) for item in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise VituneError(f"question_id {dup!r} appears more than once in the task")
    mine = shard_items(items, shard)
    done = answered_ids(out)
    todo = [item for item in mine if str(item.question_id) not in done]
    run = AnswerRun(total=len(mine), skipped=len(mine) - len(todo), written=0, failed=[])
    bar = _progress(len(todo), f"answering ({answerer.name})", progress)
    with JsonlLog(out) as log:
        for start in range(0, len(todo), max(1, answerer.chunk_size)):
            chunk = todo[start : start + max(1, answerer.chunk_size)]
            for item, ans in _answers(answerer, chunk):
                if ans.text is None:
                    run.failed.append(f"{item.question_id}: {ans.error}")
                    continue
                log.write(
                    {
                        "question_id": item.question_id,
                        "prompt": item.prompt,
                        "text": ans.text,
                        "model_id": answerer.name,
                        **item.fields,
                        **({"metadata": ans.meta} if ans.meta else {}),
                    }
                )
                run.written += 1
            bar(len(chunk))
    bar(0, close=True)
    if run.written:
        _restore_order(out, ids)
    return run


def _answers(answerer: Answerer, chunk: list[EvalItem]) -> Iterator[tuple[EvalItem, Answer]]:
    """(item, answer) pairs: one by one as they complete when the answerer can stream them (a paid
    endpoint: a kill then loses only the requests in flight), else the whole chunk at once."""
    each = getattr(answerer, "answer_each", None)
    if each is not None:
        yield from each(chunk)
        return
    answers = answerer.answer(chunk)
    if len(answers) != len(chunk):
        raise VituneError(f"{answerer.name}: {len(answers)} answers for {len(chunk)} questions")
    yield from zip(chunk, answers, strict=True)


def _restore_order(path: Path, ids: list[str]) -> None:
    """Answers streamed in completion order are put back in question order (atomically), so a
    finished log is the same file however often the run was interrupted."""
    position = {qid: i for i, qid in enumerate(ids)}
    records = read_jsonl(path)
    keys = [position.get(str(r.get("question_id")), len(ids)) for r in records]
    if keys != sorted(keys):
        atomic_write_jsonl(path, [r for _, r in sorted(zip(keys, records, strict=True), key=lambda kr: kr[0])])


def _progress(total: int, desc: str, enabled: bool) -> Callable[..., None]:
    if not enabled or total == 0:
        return lambda n, close=False: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="q", file=sys.stderr)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return update


def load_answer_texts(path: str | Path) -> dict[str, str]:
    """question_id (as a string) -> answer text, from an answers JSONL; a duplicate id is an error
    (merge shard logs with `merge_answers`, which keeps the first)."""
    out: dict[str, str] = {}
    for i, rec in enumerate(read_jsonl(path), 1):
        if "question_id" not in rec or "text" not in rec:
            raise VituneError(f"{path}: record {i}: needs 'question_id' and 'text'")
        qid = str(rec["question_id"])
        if qid in out:
            raise VituneError(f"{path}: record {i}: question_id {rec['question_id']!r} appears twice")
        out[qid] = str(rec["text"])
    return out


def merge_answers(inputs: Sequence[str | Path], out: str | Path) -> tuple[int, int]:
    """Join shard logs into one (first occurrence of an id wins). Returns (written, duplicates)."""
    seen: set[str] = set()
    merged: list[dict] = []
    duplicates = 0
    for path in inputs:
        for record in read_jsonl(path):
            if "question_id" not in record or "text" not in record:
                raise VituneError(f"{path}: a line lacks 'question_id' or 'text'")
            key = str(record["question_id"])
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            merged.append(record)
    atomic_write_jsonl(out, merged)
    return len(merged), duplicates


# --- answerers --------------------------------------------------------------------------------


def _load_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise VituneError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise VituneError(f"{path}: cannot decode image ({err})") from err


class PipelineAnswerer:
    """A vitune model through `vitune.inference.Pipeline` (batched generation)."""

    def __init__(self, pipeline: Any, params: Any, batch_size: int = 8, name: str = "vitune") -> None:
        self.pipeline = pipeline
        self.params = params
        self.batch_size = batch_size
        # Several batches per logged chunk keep the per-call overhead low; a kill loses one chunk.
        self.chunk_size = batch_size * 4
        self.name = name

    @classmethod
    def from_model_dir(
        cls, path: str | Path, params: Any, batch_size: int = 8, device: str = "auto", dtype: str = "auto"
    ) -> PipelineAnswerer:
        from vitune.inference import Pipeline

        path = Path(path)
        if not path.is_dir():
            raise VituneError(f"--model {path}: not a model directory")
        return cls(Pipeline.from_pretrained(path, device=device, dtype=dtype), params, batch_size, name=path.name)

    def answer(self, items: Sequence[EvalItem]) -> list[Answer]:
        from vitune.inference import GenerationRequest

        requests = [
            GenerationRequest(messages=item.messages(), images=[_load_image(p) for p in item.images], params=self.params)
            for item in items
        ]
        outputs = self.pipeline.generate(requests, batch_size=self.batch_size)
        return [Answer(o.text.strip(), meta={"finish_reason": o.finish_reason}) for o in outputs]


def image_data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VituneError(f"{path}: image not found") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(item: EvalItem) -> list[dict]:
    """The item as chat-completions messages: text and `image_url` parts interleaved where the
    `<image>` markers stand."""
    pieces = item.prompt.split(IMAGE_MARKER)
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        text = piece.strip("\n") if len(pieces) > 1 else piece
        if text:
            parts.append({"type": "text", "text": text})
        if k < len(item.images):
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(item.images[k])}})
    content: str | list[dict] = parts if item.images else item.prompt
    out = [{"role": "system", "content": item.system}] if item.system else []
    return [*out, {"role": "user", "content": content}]


class EndpointAnswerer:
    """Any OpenAI-compatible vision model, queried with the official `openai` client."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 3,
    ) -> None:
        import openai

        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=max_retries
        )
        self.model = model
        self.name = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.concurrency = max(1, concurrency)
        self.chunk_size = self.concurrency * 4

    def _one(self, item: EvalItem) -> Answer:
        import openai

        kwargs: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        started = time.monotonic()
        try:
            response = self.client.chat.completions.create(model=self.model, messages=openai_messages(item), **kwargs)
        except openai.OpenAIError as err:
            return Answer(None, error=f"{type(err).__name__}: {err}")
        if not response.choices or response.choices[0].message.content is None:
            return Answer(None, error="the endpoint returned no message content")
        choice = response.choices[0]
        meta = {"finish_reason": choice.finish_reason, "seconds": round(time.monotonic() - started, 3)}
        if response.usage is not None:
            meta["prompt_tokens"] = response.usage.prompt_tokens
            meta["completion_tokens"] = response.usage.completion_tokens
        return Answer(choice.message.content.strip(), meta=meta)

    def _check_images(self, items: Sequence[EvalItem]) -> None:
        # Images are read up front so a missing file is a clean error, not a failed request.
        for item in items:
            for path in item.images:
                if not path.is_file():
                    raise VituneError(f"{path}: image not found (question {item.question_id!r})")

    def answer(self, items: Sequence[EvalItem]) -> list[Answer]:
        self._check_images(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, items))

    def answer_each(self, items: Sequence[EvalItem]) -> Iterator[tuple[EvalItem, Answer]]:
        """Each (item, answer) as soon as the endpoint has answered it (completion order)."""
        self._check_images(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._one, item): item for item in items}
            for future in as_completed(futures):
                yield futures[future], future.result()
