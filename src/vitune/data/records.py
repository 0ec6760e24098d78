"""Reading training records and checking each one, field by field, before anything trains on it.

Two public forms are read natively:
- LLaVA: a JSON list or JSONL of `{"id", "image": path | [paths] | absent, "conversations":
  [{"from": "human"|"gpt"|"system", "value": str}]}`, with `<image>` in the human text where
  each image goes (`image` paths are relative to an image folder);
- messages (transformers/TRL): JSONL of `{"messages": [{"role", "content": str | [parts]}],
  "images": [paths]}`, parts being `{"type": "text", "text"}` or `{"type": "image"}`.

`check_record` turns one raw record into a `RecordSpec` (id, normalised messages, image paths)
or raises `RecordError` naming the record, the field and the reason: a missing field, a wrong
type, an empty turn, roles out of order, more `<image>` tags than images, an image file that is
missing or does not decode. Images are only opened here (header), never kept: loading is lazy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vitune.errors import VituneError
from vitune.images import load_image
from vitune.templates import IMAGE_MARKER, Message, normalize_conversation

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MESSAGE_ROLES = ("system", "user", "assistant")
_IMAGE_PARTS = ("image", "image_url", "input_image")


class RecordError(VituneError):
    """A record that cannot be trained on: `kind` is a short code for counting (e.g. `image_missing`)."""

    def __init__(self, source: str, record_id: str, field: str, reason: str, kind: str) -> None:
        super().__init__(f"{source}: record {record_id}: field '{field}': {reason}")
        self.source = source
        self.record_id = record_id
        self.field = field
        self.reason = reason
        self.kind = kind


@dataclass
class RawRecord:
    source: str  # the file, for messages
    index: int  # position in the file (0-based; the line number - 1 for JSONL)
    data: Any  # the parsed JSON value, or None when the line did not parse
    parse_error: str | None = None

    @property
    def record_id(self) -> str:
        if isinstance(self.data, dict) and isinstance(self.data.get("id"), (str, int)) and not isinstance(self.data.get("id"), bool):
            return repr(str(self.data["id"]))
        return f"#{self.index}"


@dataclass
class RecordSpec:
    record_id: str
    messages: list[Message]
    images: list[Path]


def read_records(path: str | Path) -> Iterator[RawRecord]:
    """Records of a `.json` file (a list) or a `.jsonl` file (one per line; a bad line is a bad
    record, not a dead file). Blank JSONL lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise VituneError(f"data file {path} not found")
    source = str(path)
    text_head = path.open("rb").read(64).lstrip()
    if path.suffix == ".json" or text_head.startswith(b"["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VituneError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, list):
            raise VituneError(f"{path}: a LLaVA JSON file must hold a list of records, got {type(data).__name__}")
        for i, item in enumerate(data):
            yield RawRecord(source, i, item)
        return
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")  # strictly: replacement characters would train silently
            except UnicodeDecodeError as err:
                yield RawRecord(source, i, None, f"line {i + 1} is not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            try:
                yield RawRecord(source, i, json.loads(line))
            except json.JSONDecodeError as err:
                yield RawRecord(source, i, None, f"line {i + 1} is not valid JSON ({err.msg})")


def detect_format(data: Any) -> str:
    if isinstance(data, dict):
        if "conversations" in data:
            return "llava"
        if "messages" in data:
            return "messages"
    return "unknown"


class _Checker:
    def __init__(self, raw: RawRecord) -> None:
        self.raw = raw
        self.rid = raw.record_id

    def fail(self, field: str, reason: str, kind: str) -> RecordError:
        return RecordError(self.raw.source, self.rid, field, reason, kind)


def check_record(raw: RawRecord, fmt: str, image_folder: Path | None, check_images: str = "open",
                 image_checks: dict[Path, tuple[str, str] | None] | None = None) -> RecordSpec:
    """Validate one record and normalise it; RecordError on the first problem found.

    `image_checks` memoises image verdicts across records (LLaVA data asks many questions about
    the same image): path -> None (fine) or (reason, kind)."""
    c = _Checker(raw)
    if raw.parse_error is not None:
        raise c.fail("-", raw.parse_error, "invalid_json")
    data = raw.data
    if not isinstance(data, dict):
        raise c.fail("-", f"a record must be a JSON object, got {type(data).__name__}", "wrong_type")
    if "id" in data and (not isinstance(data["id"], (str, int)) or isinstance(data["id"], bool)):
        raise c.fail("id", f"must be a string or an integer, got {type(data['id']).__name__}", "wrong_type")
    kind = detect_format(data) if fmt == "auto" else fmt
    if kind == "llava":
        turns, image_field, images = _llava_turns(c, data)
    elif kind == "messages":
        turns, image_field, images = _messages_turns(c, data)
    else:
        raise c.fail("conversations", "missing (a LLaVA record needs 'conversations'; a messages record needs 'messages')", "missing_field")

    # Roles and order, with the precise turn named (normalize_conversation would also refuse).
    roles = [t["role"] for t in turns]
    body_start = 1 if roles and roles[0] == "system" else 0
    for i in range(len(roles)):
        if i >= body_start and roles[i] == "system":
            raise c.fail(turns[i]["field"], "a system turn may only come first", "roles_out_of_order")
        if i >= body_start:
            expected = "user" if (i - body_start) % 2 == 0 else "assistant"
            if roles[i] != expected:
                raise c.fail(turns[i]["field"], f"roles out of order: expected {turns[i]['names'][expected]}, got {turns[i]['given']!r}", "roles_out_of_order")
    if len(roles) - body_start < 2:
        raise c.fail(turns[-1]["field"] if turns else "conversations", "needs at least one question and one answer", "no_answer")
    if roles[-1] != "assistant":
        raise c.fail(turns[-1]["field"], "the conversation ends with a question: the last turn must be an answer", "no_answer")

    # Image tags against images.
    n_tags = sum(t["text"].count(IMAGE_MARKER) for t in turns)
    for t in turns:
        if t["role"] == "assistant" and IMAGE_MARKER in t["text"]:
            raise c.fail(t["value_field"], f"an {IMAGE_MARKER} tag in an answer", "image_tags")
    if n_tags > len(images):
        raise c.fail(image_field if images else turns[0]["value_field"], f"{n_tags} {IMAGE_MARKER} tags but {len(images)} image(s)", "image_tags")
    if 0 < n_tags < len(images):
        raise c.fail(image_field, f"{len(images)} images but only {n_tags} {IMAGE_MARKER} tags", "image_tags")

    paths = [_check_image(c, f"{image_field}[{k}]" if len(images) > 1 else image_field, p, image_folder, check_images,
                          image_checks) for k, p in enumerate(images)]

    conversation = [t["turn"] for t in turns]
    try:
        messages = normalize_conversation(conversation, where=f"record {c.rid}")
    except VituneError as err:  # already checked above; anything left is still this record's fault
        raise c.fail("conversations", str(err), "invalid_conversation") from None
    if n_tags == 0 and images:
        # As LLaVA does, images without tags go first in the first user turn.
        first = next(i for i, m in enumerate(messages) if m.role == "user")
        messages[first] = Message("user", (IMAGE_MARKER + "\n") * len(images) + messages[first].content)
    return RecordSpec(c.rid, messages, paths)


def _llava_turns(c: _Checker, data: dict[str, Any]) -> tuple[list[dict[str, Any]], str, list[Any]]:
    image = data.get("image")
    if image is None:
        images: list[Any] = []
    elif isinstance(image, str):
        if not image.strip():
            raise c.fail("image", "empty path", "wrong_type")
        images = [image]
    elif isinstance(image, list):
        for k, p in enumerate(image):
            if not isinstance(p, str) or not p.strip():
                raise c.fail(f"image[{k}]", f"must be a non-empty path string, got {p!r}", "wrong_type")
        images = list(image)
    else:
        raise c.fail("image", f"must be a path or a list of paths, got {type(image).__name__}", "wrong_type")
    convs = data.get("conversations")
    if convs is None:
        raise c.fail("conversations", "missing", "missing_field")
    if not isinstance(convs, list):
        raise c.fail("conversations", f"must be a list of turns, got {type(convs).__name__}", "wrong_type")
    if not convs:
        raise c.fail("conversations", "empty conversation", "empty_turn")
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    turns = []
    for i, turn in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise c.fail(where, f"must be an object with 'from' and 'value', got {type(turn).__name__}", "wrong_type")
        if "from" not in turn:
            raise c.fail(f"{where}.from", "missing", "missing_field")
        if "value" not in turn:
            raise c.fail(f"{where}.value", "missing", "missing_field")
        given, value = turn["from"], turn["value"]
        if not isinstance(given, str) or given not in _LLAVA_ROLES:
            raise c.fail(f"{where}.from", f"unknown role {given!r} (human, gpt or system)", "unknown_role")
        if not isinstance(value, str):
            raise c.fail(f"{where}.value", f"must be a string, got {type(value).__name__}", "wrong_type")
        if not value.strip():
            raise c.fail(f"{where}.value", "empty turn", "empty_turn")
        turns.append({"role": _LLAVA_ROLES[given], "text": value, "turn": {"from": given, "value": value},
                      "field": f"{where}.from", "value_field": f"{where}.value", "given": given, "names": names})
    return turns, "image", images


def _messages_turns(c: _Checker, data: dict[str, Any]) -> tuple[list[dict[str, Any]], str, list[Any]]:
    images = data.get("images")
    if images is None:
        images = []
    elif not isinstance(images, list):
        raise c.fail("images", f"must be a list of paths, got {type(images).__name__}", "wrong_type")
    paths = []
    for k, p in enumerate(images):
        if isinstance(p, dict) and isinstance(p.get("path"), str):
            p = p["path"]
        if not isinstance(p, str) or not p.strip():
            raise c.fail(f"images[{k}]", f"must be a non-empty path string, got {p!r}", "wrong_type")
        paths.append(p)
    msgs = data.get("messages")
    if not isinstance(msgs, list):
        raise c.fail("messages", f"must be a list of messages, got {type(msgs).__name__}", "wrong_type")
    if not msgs:
        raise c.fail("messages", "empty conversation", "empty_turn")
    names = {"user": "user", "assistant": "assistant", "system": "system"}
    turns = []
    for i, msg in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise c.fail(where, f"must be an object with 'role' and 'content', got {type(msg).__name__}", "wrong_type")
        if "role" not in msg:
            raise c.fail(f"{where}.role", "missing", "missing_field")
        if "content" not in msg:
            raise c.fail(f"{where}.content", "missing", "missing_field")
        role, content = msg["role"], msg["content"]
        if role not in _MESSAGE_ROLES:
            raise c.fail(f"{where}.role", f"unknown role {role!r} (system, user or assistant)", "unknown_role")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise c.fail(f"{where}.content[{j}].text", "must be a string", "wrong_type")
                    pieces.append(part["text"])
                elif kind in _IMAGE_PARTS:
                    pieces.append(IMAGE_MARKER)
                else:
                    raise c.fail(f"{where}.content[{j}]", f"unsupported content part {kind!r} (text or image)", "wrong_type")
            text = "\n".join(pieces)
        else:
            raise c.fail(f"{where}.content", f"must be a string or a list of parts, got {type(content).__name__}", "wrong_type")
        if not text.strip() or (role == "assistant" and not text.replace(IMAGE_MARKER, "").strip()):
            raise c.fail(f"{where}.content", "empty turn", "empty_turn")
        turns.append({"role": role, "text": text, "turn": {"role": role, "content": content},
                      "field": f"{where}.role", "value_field": f"{where}.content", "given": role, "names": names})
    return turns, "images", paths


def resolve_image(path: str, image_folder: Path | None) -> Path:
    p = Path(path)
    if p.is_absolute() or image_folder is None:
        return p
    return image_folder / p


def _check_image(c: _Checker, field: str, path: str, image_folder: Path | None, level: str,
                 memo: dict[Path, tuple[str, str] | None] | None = None) -> Path:
    full = resolve_image(path, image_folder)
    if memo is not None and full in memo:
        verdict = memo[full]
    else:
        verdict = image_problem(full, level)
        if memo is not None:
            memo[full] = verdict
    if verdict is not None:
        raise c.fail(field, verdict[0], verdict[1])
    return full


def image_problem(full: Path, level: str) -> tuple[str, str] | None:
    """(reason, kind) of what is wrong with an image file at this checking level, or None."""
    if not full.is_file():
        return f"image file not found: {full}", "image_missing"
    if level == "open":
        try:
            with Image.open(full) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            return f"not a decodable image: {full} ({err})", "image_undecodable"
        if width < 1 or height < 1:
            return f"image has no pixels: {full}", "image_undecodable"
    elif level == "decode":
        try:
            load_image(full, where=str(full))
        except VituneError as err:
            return f"not a decodable image: {err}", "image_undecodable"
    return None
