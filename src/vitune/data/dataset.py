"""From record files to training samples: one validating, tokenizing pass, then lazy image loading.

`prepare_data` reads every record once: it checks it (`records.check_record`), renders it with the
chat template into ids and labels, applies the token budget, and keeps only compact arrays (token
ids with one placeholder per image, a supervised-token mask, image paths). Images are never
decoded here (only their headers opened), so the 665K-sample LLaVA mix costs a few bytes per
token in memory and no pixels. Bad records raise (`on_bad_record="error"`) or go to the
quarantine JSONL with their reason (`"skip"`); the report counts every skip by kind.

The token budget counts image placeholders: each image stands for `num_image_tokens` positions.
A sample over `max_length` is cut after its last image when that still leaves answer tokens to
learn; a cut that would fall inside or before an image's placeholders skips the sample with the
reason (in both modes: an over-long sample is not a malformed one).

`SupervisedDataset[i]` expands the placeholders, builds labels and decodes the images (in
DataLoader workers when configured; the collator preprocesses a batch's images in one call); it
skips the images whose vision features are already cached (`cached` flags, see the trainer's
feature cache).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from vitune.data.records import RawRecord, RecordError, RecordSpec, check_record, read_records
from vitune.errors import VituneError
from vitune.images import load_image
from vitune.templates import IGNORE_INDEX, Message, encode_conversation


class Quarantine:
    """Skipped records, one JSON line each (flushed per line): the record, the field and the reason."""

    def __init__(self, path: str | Path | None, write: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.write = write and self.path is not None
        self.counts: Counter[str] = Counter()
        self._file: IO[str] | None = None

    def add(self, err: RecordError, record: Any = None, index: int | None = None) -> None:
        self.counts[err.kind] += 1
        if not self.write:
            return
        if self._file is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        line = {"source": err.source, "index": index, "id": err.record_id, "field": err.field, "kind": err.kind,
                "reason": err.reason, "record": record}
        self._file.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class PreparedData:
    """Every kept sample as slices of flat arrays (compact: one placeholder id per image)."""

    ids: np.ndarray  # int32, all samples' compact ids back to back
    supervised: np.ndarray  # bool, same length: True where the label is the id
    offsets: np.ndarray  # int64 [n + 1] into ids
    lengths: np.ndarray  # int32 [n] expanded lengths (what the model sees)
    num_supervised: np.ndarray  # int32 [n] label tokens per sample (for loss normalisation)
    image_offsets: np.ndarray  # int64 [n + 1] into image_index
    image_index: np.ndarray  # int32 indices into image_paths
    image_paths: list[str]  # unique image files
    record_ids: list[str]
    sources: list[tuple[str, int]]  # (file, index) of each kept sample
    num_records: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def has_image(self) -> np.ndarray:
        return np.diff(self.image_offsets) > 0

    def summary(self) -> dict[str, Any]:
        return {"records": self.num_records, "kept": len(self), "skipped": sum(self.skipped.values()),
                "skipped_by_kind": dict(self.skipped), "truncated": self.truncated, "images": len(self.image_paths),
                "tokens": int(self.lengths.sum()), "max_length": int(self.lengths.max()) if len(self) else 0}


def expanded_length(ids: np.ndarray, image_token_id: int, num_image_tokens: int) -> int:
    return len(ids) + int((ids == image_token_id).sum()) * (num_image_tokens - 1)


def truncate_sample(
    ids: np.ndarray, supervised: np.ndarray, image_token_id: int, num_image_tokens: int, max_length: int
) -> tuple[np.ndarray, np.ndarray] | str:
    """Compact ids/mask within `max_length` expanded tokens, or the reason the sample is skipped.

    The cut never falls inside an image's placeholders: either all images fit and the text after
    them is cut, or the sample is skipped. A cut that leaves no answer token also skips it.
    """
    widths = np.where(ids == image_token_id, num_image_tokens, 1)
    ends = np.cumsum(widths)
    total = int(ends[-1]) if len(ends) else 0
    if total <= max_length:
        return ids, supervised
    image_pos = np.flatnonzero(ids == image_token_id)
    for k, pos in enumerate(image_pos):
        start, end = int(ends[pos]) - num_image_tokens, int(ends[pos])
        if end > max_length:
            where = "inside" if start < max_length else "before"
            return (f"{total} tokens over max_length {max_length}, and the cut would fall {where} image {k}'s "
                    f"placeholders (tokens {start}-{end - 1})")
    keep = int(np.searchsorted(ends, max_length, side="right"))
    if not supervised[:keep].any():
        return f"{total} tokens over max_length {max_length}, and no answer token is left before the cut"
    return ids[:keep], supervised[:keep]


class _BatchingTokenizer:
    """Stands in for the tokenizer inside `templates.encode_conversation`, so that function stays
    the one rule for ids and labels: a first pass records the text pieces it asks for, one batched
    (and de-duplicated) tokenizer call encodes them, a second pass answers from that table."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._table: dict[str, list[int] | None] = {}
        self._recording = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, text: Any, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        if add_special_tokens or kwargs or not isinstance(text, str):
            return self._tokenizer(text, add_special_tokens=add_special_tokens, **kwargs)
        if self._recording:
            self._table.setdefault(text, None)
            return {"input_ids": []}
        ids = self._table.get(text)
        return {"input_ids": ids if ids is not None else self._tokenizer(text, add_special_tokens=False)["input_ids"]}

    def encode_recorded(self) -> None:
        todo = [t for t, ids in self._table.items() if ids is None]
        if todo:
            for text, ids in zip(todo, self._tokenizer(todo, add_special_tokens=False)["input_ids"], strict=True):
                self._table[text] = ids
        self._recording = False


def encode_batch(template: Any, conversations: list[list[Message]], tokenizer: Any,
                 image_token_id: int) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """Compact ids and supervised masks of many conversations (one placeholder id per image), or
    the reason a conversation cannot be encoded; `encode_conversation`'s result, with the
    tokenizer called once for the whole batch (per-call overhead dominates short pieces)."""
    shim = _BatchingTokenizer(tokenizer)
    errors: dict[int, str] = {}
    for i, messages in enumerate(conversations):
        try:
            encode_conversation(template, messages, shim, image_token_id, 1)
        except VituneError as err:
            errors[i] = str(err)
    shim.encode_recorded()
    out: list[tuple[np.ndarray, np.ndarray] | str] = []
    for i, messages in enumerate(conversations):
        if i in errors:
            out.append(errors[i])
            continue
        enc = encode_conversation(template, messages, shim, image_token_id, 1)
        out.append((np.asarray(enc.input_ids, dtype=np.int32), np.asarray(enc.labels, dtype=np.int64) != IGNORE_INDEX))
    return out


def prepare_data(
    paths: list[str | Path],
    processor: Any,
    template: Any,
    max_length: int,
    image_folder: str | Path | None = None,
    fmt: str = "auto",
    on_bad_record: str = "error",
    check_images: str = "open",
    quarantine: Quarantine | None = None,
    limit: int | None = None,
    progress: bool = False,
    chunk_size: int = 1024,
) -> PreparedData:
    """Read, check and tokenize every record of `paths` (see the module docstring)."""
    if on_bad_record not in ("error", "skip"):
        raise VituneError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    quarantine = quarantine or Quarantine(None)
    tok = processor.tokenizer
    image_token_id = int(processor.config.image_token_id)
    num_image_tokens = int(processor.config.num_image_tokens)
    ids_chunks: list[np.ndarray] = []
    sup_chunks: list[np.ndarray] = []
    lengths: list[int] = []
    n_sup: list[int] = []
    images_per_sample: list[list[int]] = []
    image_ids: dict[str, int] = {}
    image_checks: dict[Path, tuple[str, str] | None] = {}
    record_ids: list[str] = []
    sources: list[tuple[str, int]] = []
    counters = {"records": 0, "truncated": 0}

    def fail(err: RecordError, raw: RawRecord) -> None:
        if on_bad_record == "error":
            raise err
        quarantine.add(err, raw.data, raw.index)

    def flush(chunk: list[tuple[RawRecord, RecordSpec | RecordError]]) -> None:
        valid = [spec for _, spec in chunk if isinstance(spec, RecordSpec)]
        encodings = iter(encode_batch(template, [spec.messages for spec in valid], tok, image_token_id))
        for raw, spec in chunk:
            if isinstance(spec, RecordError):
                fail(spec, raw)
                continue
            enc = next(encodings)
            if isinstance(enc, str):
                fail(RecordError(raw.source, raw.record_id, "conversations", enc, "invalid_conversation"), raw)
                continue
            ids, sup = enc
            if not sup[1:].any():
                fail(RecordError(raw.source, raw.record_id, "conversations", "no answer tokens to learn", "no_answer"), raw)
                continue
            cut = truncate_sample(ids, sup, image_token_id, num_image_tokens, max_length)
            if isinstance(cut, str):
                # Over-long is not malformed: skipped with its reason in both modes.
                quarantine.add(RecordError(raw.source, raw.record_id, "conversations", cut, "too_long"), raw.data, raw.index)
                continue
            if len(cut[0]) < len(ids):
                counters["truncated"] += 1
            ids, sup = cut
            ids_chunks.append(ids)
            sup_chunks.append(sup)
            lengths.append(expanded_length(ids, image_token_id, num_image_tokens))
            n_sup.append(int(sup[1:].sum()))  # the first token is never predicted
            images_per_sample.append([image_ids.setdefault(str(p), len(image_ids)) for p in spec.images])
            record_ids.append(spec.record_id)
            sources.append((raw.source, raw.index))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="preparing data", unit=" records", file=sys.stderr, mininterval=1.0)
    try:
        chunk: list[tuple[RawRecord, RecordSpec | RecordError]] = []
        for path in paths:
            path = Path(path)
            folder = Path(image_folder) if image_folder is not None else path.parent
            for raw in read_records(path):
                if limit is not None and counters["records"] >= limit:
                    break
                counters["records"] += 1
                try:
                    chunk.append((raw, check_record(raw, fmt, folder, check_images, image_checks)))
                except RecordError as err:
                    chunk.append((raw, err))
                if len(chunk) >= chunk_size:
                    flush(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    chunk = []
        flush(chunk)
        if bar is not None:
            bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    offsets = np.zeros(len(ids_chunks) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in ids_chunks])
    image_offsets = np.zeros(len(images_per_sample) + 1, dtype=np.int64)
    image_offsets[1:] = np.cumsum([len(c) for c in images_per_sample])
    return PreparedData(
        ids=np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, np.int32),
        supervised=np.concatenate(sup_chunks) if sup_chunks else np.zeros(0, bool),
        offsets=offsets,
        lengths=np.asarray(lengths, dtype=np.int32),
        num_supervised=np.asarray(n_sup, dtype=np.int32),
        image_offsets=image_offsets,
        image_index=np.asarray([i for c in images_per_sample for i in c], dtype=np.int32),
        image_paths=list(image_ids),
        record_ids=record_ids,
        sources=sources,
        num_records=counters["records"],
        truncated=counters["truncated"],
        skipped=dict(quarantine.counts),
    )


class SupervisedDataset(torch.utils.data.Dataset):
    """Sample i: expanded ids and labels, its images' global keys, and (lazily) their pixels."""

    def __init__(self, data: PreparedData, processor: Any, on_bad_record: str = "error") -> None:
        self.data = data
        self.processor = processor
        self.image_token_id = int(processor.config.image_token_id)
        self.num_image_tokens = int(processor.config.num_image_tokens)
        self.on_bad_record = on_bad_record
        # Images whose vision features the trainer has cached: their pixels are not needed.
        # Workers see a snapshot taken when the epoch's DataLoader starts.
        self.cached = np.zeros(len(data.image_paths), dtype=bool)

    def __len__(self) -> int:
        return len(self.data)

    def token_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        ids = d.ids[d.offsets[i] : d.offsets[i + 1]].astype(np.int64)
        sup = d.supervised[d.offsets[i] : d.offsets[i + 1]]
        labels = np.where(sup, ids, IGNORE_INDEX)
        if self.num_image_tokens != 1:
            repeats = np.where(ids == self.image_token_id, self.num_image_tokens, 1)
            ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
        return ids, labels

    def image_keys(self, i: int) -> np.ndarray:
        d = self.data
        return d.image_index[d.image_offsets[i] : d.image_offsets[i + 1]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels = self.token_arrays(i)
        keys = self.image_keys(i)
        images = None
        if len(keys) and not self.cached[keys].all():
            try:
                images = [load_image(self.data.image_paths[k], where=self.data.image_paths[k]) for k in keys]
            except VituneError as err:
                source, index = self.data.sources[i]
                bad = RecordError(source, self.data.record_ids[i], "image", str(err), "image_undecodable")
                if self.on_bad_record == "error":
                    raise bad from None
                return {"index": i, "bad": bad}
        return {"index": i, "input_ids": ids, "labels": labels, "image_keys": keys, "images": images}
