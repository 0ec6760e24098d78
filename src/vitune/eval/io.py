"""File I/O shared by the evaluation commands: JSON/JSONL reading with errors that name the file
and line, and the append-only answer/review logs that make phase 1 resumable (whole-file writes
are `vitune.io`'s).

An append log is flushed after every line, so a killed run loses at most the line in flight; a
torn last line (no trailing newline) is cut off when the log is reopened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Self

from vitune.errors import VituneError
from vitune.io import read_json


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file; each must be a JSON object. A torn last line (a run killed
    mid-write, so no trailing newline) is skipped rather than failing the whole file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise VituneError(f"{path}: file not found") from err
    lines = text.split("\n")
    records: list[dict] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # last line without "\n": torn write
                break
            raise VituneError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise VituneError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_records(path: str | Path) -> list[dict]:
    """A JSON list of objects (`.json`) or JSONL: LLaVA publishes both for the same data."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise VituneError(f"{path}: expected a JSON list of objects")
        return data
    return read_jsonl(path)


class JsonlLog:
    """An append-only JSONL file, one flushed line per record, reopened safely after a kill."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
