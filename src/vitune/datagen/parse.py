"""Teacher output -> conversation turns, with validation; what fails goes to quarantine with a reason.

The teacher writes `conversation` and `complex` responses as labelled blocks

    Question:
    <question>
    ===
    Answer:
    <answer>
    ===

(labels on their own line or followed by text; `===` separators optional), and `detail` responses
as plain prose. A response is rejected, with one of `QUARANTINE_REASONS`, when it is
empty, a refusal, cut off by the token limit, unparseable (no labels where they are needed),
has the wrong turn structure (not question/answer alternating, a complex response with more or
fewer than one pair, a detail response with labels), talks about its own input ("the
description", coordinates, bounding boxes) instead of the image, or is too short.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

QUARANTINE_REASONS: tuple[str, ...] = (
    "request_failed",
    "empty",
    "refusal",
    "truncated",
    "unparseable",
    "wrong_turn_structure",
    "leaked_context",
    "too_short",
)

_LABEL = re.compile(r"^\s*(?:\*\*)?\s*(question|answer|q|a|user|human|assistant|gpt)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.*)$", re.I)
_SEPARATOR = re.compile(r"^\s*(?:={3,}|-{3,})\s*$")
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can(?:no|')t|i am (?:un)?able|i'm unable|"
    r"as an ai\b|i (?:do not|don't) have (?:access|the ability))",
    re.I,
)
# A teacher that talks about its input instead of the image: LLaVA's data must read as if seen.
_LEAK = re.compile(
    r"bounding box|coordinates?\b|\[\s*0?\.\d+\s*,|\bthe (?:given |provided )?(?:description|captions?|context)\b"
    r"|\bdescription (?:provided|given)\b|\bas described\b",
    re.I,
)
_ROLE = {"question": "human", "q": "human", "user": "human", "human": "human",
         "answer": "gpt", "a": "gpt", "assistant": "gpt", "gpt": "gpt"}  # fmt: skip
MIN_DETAIL_WORDS = 15


class ParseError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in QUARANTINE_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt"
    text: str


def _check_common(text: str | None, finish_reason: str | None) -> str:
    if text is None or not text.strip():
        raise ParseError("empty", "the teacher returned no text")
    if finish_reason == "length":
        raise ParseError("truncated", "the response hit the token limit (finish_reason=length)")
    _check_refusal(text.strip())
    return text.strip()


def _check_refusal(text: str) -> None:
    if _REFUSAL.match(text):
        raise ParseError("refusal", text.splitlines()[0][:120])


def _check_leak(texts: list[str]) -> None:
    for t in texts:
        m = _LEAK.search(t)
        if m:
            raise ParseError("leaked_context", f"mentions {m.group(0)!r}")


def parse_turns(text: str) -> list[Turn]:
    """Labelled blocks -> turns (consecutive lines of one block joined with newlines)."""
    turns: list[list] = []
    for line in text.splitlines():
        if _SEPARATOR.match(line):
            continue
        m = _LABEL.match(line)
        if m:
            turns.append([_ROLE[m.group(1).lower()], [m.group(2)] if m.group(2).strip() else []])
        elif turns:
            turns[-1][1].append(line)
        elif line.strip():
            raise ParseError("unparseable", f"text before the first 'Question:' label: {line.strip()[:80]!r}")
    if not turns:
        raise ParseError("unparseable", "no 'Question:'/'Answer:' labels found")
    out = []
    for role, lines in turns:
        body = "\n".join(lines).strip()
        if not body:
            raise ParseError("wrong_turn_structure", f"an empty {'question' if role == 'human' else 'answer'}")
        out.append(Turn(role, body))
    return out


def _check_alternation(turns: list[Turn]) -> None:
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.role != expected:
            raise ParseError(
                "wrong_turn_structure",
                f"turn {i + 1} is {'a question' if turn.role == 'human' else 'an answer'}, expected "
                f"{'a question' if expected == 'human' else 'an answer'}",
            )
    if len(turns) % 2:
        raise ParseError("wrong_turn_structure", "the last question has no answer")


def parse_response(kind: str, text: str | None, finish_reason: str | None = None) -> list[Turn]:
    """Validated turns of one teacher response (for `detail`, the single description turn)."""
    body = _check_common(text, finish_reason)
    if kind == "detail":
        if any(_LABEL.match(line) for line in body.splitlines()):
            raise ParseError("wrong_turn_structure", "a detail description must be prose, not labelled turns")
        _check_leak([body])
        if len(body.split()) < MIN_DETAIL_WORDS:
            raise ParseError("too_short", f"{len(body.split())} words (< {MIN_DETAIL_WORDS})")
        return [Turn("gpt", body)]
    turns = parse_turns(body)
    _check_alternation(turns)
    if kind == "complex" and len(turns) != 2:
        raise ParseError("wrong_turn_structure", f"a complex response has one question and one answer, got {len(turns) // 2} pairs")
    if kind == "conversation" and len(turns) < 2:
        raise ParseError("wrong_turn_structure", "a conversation needs at least one question and answer")
    for turn in turns:
        if turn.role == "gpt":
            _check_refusal(turn.text)
    _check_leak([t.text for t in turns])
    return turns


class Quarantine:
    """Rejected responses, one JSON line each (flushed per line), with a count per reason."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: Counter = Counter()
        self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)  # a stale file from an earlier run would mislead


    def add(self, reason: str, *, source_id: str, kind: str, key: str, detail: str, text: str | None) -> None:
        self.counts[reason] += 1
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("w", encoding="utf-8")
            record = {"reason": reason, "detail": detail, "source_id": source_id, "kind": kind, "key": key, "text": text}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
