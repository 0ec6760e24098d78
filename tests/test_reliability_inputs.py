"""The broken-input corpus (`tests/fixtures/bad_inputs/corpus.py`) through every entry point that
reads it: image decoding and preprocessing, the training data loader (record checks, lazy image
loading), and a whole training run with `--on-bad-record skip`. Each input is either handled
correctly or rejected with the record id and the reason; nothing is dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.bad_inputs.corpus import IMAGES, records, write_images, write_records_jsonl

from vitune.errors import VituneError
from vitune.images import load_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    write_images(root / "images")
    write_records_jsonl(root / "records.jsonl", records("images"))
    return root


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    from vitune.processor import LlavaProcessor

    return LlavaProcessor.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", list(IMAGES))
def test_each_image_is_loaded_or_rejected_by_name(corpus: Path, processor, name: str) -> None:
    path = corpus / "images" / name
    outcome, detail = IMAGES[name][1]
    if outcome == "reject":
        with pytest.raises(VituneError, match=detail) as info:
            load_image(path)
        assert name in str(info.value)
        return
    img = load_image(path)
    assert img.mode == "RGB" and img.size == detail
    pixels = processor.preprocess_images([path])
    side = processor.image_size
    assert pixels.shape == (1, 3, side, side) and torch.isfinite(pixels).all()


def test_decoded_pixels_are_right(corpus: Path) -> None:
    """Not only the sizes: modes convert to the colours a viewer shows."""
    img = lambda n: load_image(corpus / "images" / n)  # noqa: E731
    assert img("rgba.png").getpixel((2, 2)) == (255, 255, 255)  # transparent on white
    assert img("palette_transparent.png").getpixel((0, 0)) == (255, 255, 255)
    r, g, b = img("gray16.png").getpixel((0, 0))
    assert r == g == b and abs(r - 40000 // 256) <= 1  # scaled from 16 bits, not clipped
    assert img("png_named.jpg").getpixel((0, 0)) == (1, 2, 3)  # read by content, not extension
    c = img("cmyk.jpg").getpixel((3, 3))
    assert c[0] > 150 and c[1] < 80 and c[2] < 60  # CMYK red stays red
    assert img("exif_rotated.jpg").getpixel((5, 15))[1] > 150


def prepared(paths: list[Path], processor, on_bad: str, check: str = "open", quarantine=None):
    from vitune.data.dataset import prepare_data

    return prepare_data(paths, processor, processor.template, 256, None, "auto", on_bad, check, quarantine)


CASES = records("images")


@pytest.mark.parametrize("rid,record,expected", CASES, ids=[c[0] for c in CASES])
def test_each_record_alone_is_kept_or_rejected_with_id_and_reason(corpus: Path, processor, rid: str, record, expected: str,
                                                                  tmp_path: Path) -> None:
    from vitune.data.dataset import SupervisedDataset
    from vitune.data.records import RecordError

    path = write_records_jsonl(corpus / f"one-{abs(hash(rid))}.jsonl", [(rid, record, expected)])
    if expected == "ok":
        data = prepared([path], processor, "error")
        assert len(data) == 1
        item = SupervisedDataset(data, processor, "error")[0]
        assert "bad" not in item and len(item["input_ids"]) == len(item["labels"])
        return
    with pytest.raises(RecordError) as info:
        data = prepared([path], processor, "error")
        # images whose header opens but whose pixels do not are found when the sample is loaded
        SupervisedDataset(data, processor, "error")[0]
    err = info.value
    assert err.kind == expected, str(err)
    assert str(path) in str(err) and err.reason
    if rid == "invalid-utf8":
        assert "not valid UTF-8" in err.reason
    named = f"'{rid}'" if isinstance(record, dict) and isinstance(record.get("id"), str) else "#0"
    assert err.record_id == named and f"record {named}" in str(err)


def test_skip_mode_keeps_the_good_and_quarantines_every_bad_one(corpus: Path, processor, tmp_path: Path) -> None:
    from vitune.data.dataset import Quarantine, SupervisedDataset

    q = Quarantine(tmp_path / "q.jsonl")
    data = prepared([corpus / "records.jsonl"], processor, "skip", "open", q)
    q.close()
    ds = SupervisedDataset(data, processor, "skip")
    late = {}
    for i in range(len(ds)):
        item = ds[i]
        if "bad" in item:
            late[item["bad"].record_id] = item["bad"].kind
    lines = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    early = {line["id"]: line["kind"] for line in lines}
    assert all(line["reason"] and line["field"] for line in lines)

    def key(rid: str, record) -> str:
        return f"'{rid}'" if isinstance(record, dict) and isinstance(record.get("id"), str) else None

    expected_bad = {key(r, rec): e for r, rec, e in CASES if e != "ok"}
    got = {**early, **late}
    named = {k: v for k, v in expected_bad.items() if k is not None}
    assert {k: got.get(k) for k in named} == named
    # records without a usable id are named by position, with the right reasons
    unnamed = sorted(e for r, rec, e in CASES if e != "ok" and key(r, rec) is None)
    assert sorted(v for k, v in got.items() if k.startswith("#")) == unnamed
    kept = {data.record_ids[i] for i in range(len(data)) if i not in {j for j in range(len(ds)) if "bad" in ds[j]}}
    assert kept == {f"'{r}'" for r, _, e in CASES if e == "ok"}
    assert data.summary()["skipped"] == len(early) and sum(data.skipped.values()) == len(early)
    # with images decoded up front, every image failure is found before training
    q2 = Quarantine(tmp_path / "q2.jsonl")
    decoded = prepared([corpus / "records.jsonl"], processor, "skip", "decode", q2)
    q2.close()
    assert len(decoded) == len(kept) and sum(decoded.skipped.values()) == sum(1 for _, _, e in CASES if e != "ok")


def test_a_json_list_file_with_invalid_utf8_is_refused_by_name(tmp_path: Path, processor) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"id": "a", "conversations": [{"from": "human", "value": "caf\xe9"}]}]')
    with pytest.raises(VituneError, match="data.json"):
        prepared([path], processor, "skip")


def test_training_skips_the_bad_records_and_reports_them(corpus: Path, tiny_model_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from vitune.cli import main

    out = tmp_path / "run"
    args = ["train", "world-stage2", f"model.path={tiny_model_dir}", f"data.path={corpus / 'records.jsonl'}",
            f"data.image_folder={corpus}", f"train.output_dir={out}", "train.batch_size=4", "train.micro_batch_size=2",
            "train.max_steps=3", "stage.lora=null", "model.projector=null", "stage.parts.llm=1e-3", "stage.parts.projector=1e-3", "train.progress=false",
            "train.log_every=1", "data.check_images=open", "train.cache_image_features=off", "train.compile=false"]
    # without skip, the first bad record stops the run, named
    assert main([*args, "--on-bad-record", "error"]) == 2
    err = capsys.readouterr().err
    assert "records.jsonl: record" in err and "field" in err
    assert main([*args, "train.overwrite=true", "data.check_images=decode", "--on-bad-record", "skip"]) == 0
    printed = capsys.readouterr()
    bad = sorted(e for _, _, e in CASES if e != "ok")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["records"] == len(CASES)
    assert summary["data"]["kept"] == len(CASES) - len(bad) and summary["data"]["skipped"] == len(bad)
    assert sum(summary["data"]["skipped_by_kind"].values()) == len(bad)
    assert f"{len(bad)} skipped" in printed.out + printed.err  # reported as it runs, not only in the file
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["kind"] for q in quarantined) == bad
    assert all(q["id"] and q["reason"] for q in quarantined)
    assert (out / "model" / "model.safetensors").is_file()
