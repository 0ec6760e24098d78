"""The decoder's incremental detokenization (a speed change made for the benchmark): the streamed
pieces join to exactly the tokenizer's full decoding, with multi-byte characters split across
tokens, sentencepiece-style spaces, and stop strings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.presets import train_bench_tokenizer  # noqa: E402
from vitune.generation import Decoder, SamplingParams, _Row  # noqa: E402


def _stream(tok, ids: list[int], stops: tuple[str, ...] = (), stream: bool = True) -> tuple[list[str], str | None]:
    def decode(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=True)

    dec = Decoder(model=None, decode=decode, eos_ids=set(), pad_id=0)
    row = _Row(prompt=[1], params=SamplingParams(max_new_tokens=len(ids)), stops=stops, generator=None)
    pieces: list[str] = []
    for t in ids:
        row.out.append(t)
        event = dec._advance(0, row, t, stream)
        if event is not None:
            pieces.append(event.text)
        if row.finish is not None:
            break
    return pieces, row.finish


@pytest.fixture(scope="module")
def byte_level():
    return train_bench_tokenizer(700)


TEXT = "  Café au lait — 日本語 and ünïcödé!  two  spaces\nnext line 🙂."


def test_byte_level_pieces_join_to_the_full_decoding(byte_level) -> None:
    ids = byte_level(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 20 and any("\ufffd" in byte_level.decode([i]) for i in ids)  # characters split across tokens
    pieces, finish = _stream(byte_level, ids)
    assert finish == "length" and len(pieces) > 5
    assert "".join(pieces) == byte_level.decode(ids).lstrip()
    assert not any("\ufffd" in p for p in pieces)


def test_unstreamed_row_yields_one_event_with_the_whole_text(byte_level) -> None:
    ids = byte_level(TEXT, add_special_tokens=False)["input_ids"]
    pieces, finish = _stream(byte_level, ids, stream=False)
    assert finish == "length" and pieces == [byte_level.decode(ids).lstrip()]


def test_stop_string_cuts_incremental_text(byte_level) -> None:
    ids = byte_level(TEXT, add_special_tokens=False)["input_ids"]
    pieces, finish = _stream(byte_level, ids, stops=("日本",), stream=False)
    assert finish == "stop"
    assert "".join(pieces) == TEXT.lstrip()[: TEXT.lstrip().index("日本")]


def test_metaspace_tokenizer_spaces(tmp_path: Path) -> None:
    from vitune.testing import train_tokenizer

    tok = train_tokenizer(tmp_path)
    ids = tok("the circle is red. a blue square is on the left of the triangle", add_special_tokens=False)["input_ids"]
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True).lstrip()
