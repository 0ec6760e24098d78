"""Record reading and validation: every bad record is named by id, field and reason; skip mode
quarantines and counts; nothing is dropped silently; images are not decoded up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vitune.data.dataset import Quarantine, prepare_data
from vitune.data.records import RawRecord, RecordError, check_record, read_records
from vitune.errors import VituneError


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("records")
    (root / "images").mkdir()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(root / "images" / "a.png")
    Image.new("RGB", (12, 12), (10, 200, 10)).save(root / "images" / "b.jpg")
    (root / "images" / "broken.png").write_bytes(b"this is not an image at all")
    return root


def good(**over):
    rec = {"id": "r1", "image": "images/a.png",
           "conversations": [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red."}]}
    rec.update(over)
    return rec


def check(data, folder: Path, fmt: str = "auto"):
    return check_record(RawRecord("train.json", 3, data), fmt, folder)


def test_good_llava_record(folder: Path) -> None:
    spec = check(good(), folder)
    assert spec.record_id == "'r1'"
    assert [m.role for m in spec.messages] == ["user", "assistant"]
    assert spec.images == [folder / "images" / "a.png"]


BAD = [
    ("missing image file", good(image="images/nope.png"), "image", "image_missing", "not found"),
    ("undecodable image", good(image="images/broken.png"), "image", "image_undecodable", "not a decodable image"),
    ("more tags than images", good(conversations=[{"from": "human", "value": "<image> <image> which?"}, {"from": "gpt", "value": "x"}]),
     "image", "image_tags", "2 <image> tags but 1 image"),
    ("fewer tags than images", good(image=["images/a.png", "images/b.jpg"]), "image", "image_tags", "only 1"),
    ("empty turn", good(conversations=[{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "   "}]),
     "conversations[1].value", "empty_turn", "empty turn"),
    ("roles out of order", good(conversations=[{"from": "human", "value": "<image> a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]),
     "conversations[1].from", "roles_out_of_order", "expected gpt, got 'human'"),
    ("starts with gpt", good(conversations=[{"from": "gpt", "value": "<image> a"}, {"from": "human", "value": "b"}]),
     "conversations[0].from", "roles_out_of_order", "expected human"),
    ("ends with a question", good(conversations=[{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]),
     "conversations[2].from", "no_answer", "ends with a question"),
    ("missing conversations", {"id": "r1", "image": "images/a.png"}, "conversations", "missing_field", "missing"),
    ("missing value", good(conversations=[{"from": "human"}, {"from": "gpt", "value": "x"}]), "conversations[0].value", "missing_field", "missing"),
    ("conversations wrong type", good(conversations="hello"), "conversations", "wrong_type", "must be a list"),
    ("value wrong type", good(conversations=[{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]), "conversations[0].value", "wrong_type", "must be a string"),
    ("image wrong type", good(image=7), "image", "wrong_type", "path or a list"),
    ("id wrong type", good(id=[1]), "id", "wrong_type", "string or an integer"),
    ("unknown role", good(conversations=[{"from": "robot", "value": "<image> a"}, {"from": "gpt", "value": "x"}]), "conversations[0].from", "unknown_role", "unknown role"),
    ("image tag in answer", good(conversations=[{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "see <image>"}]),
     "conversations[1].value", "image_tags", "in an answer"),
    ("tags but no image", {"id": "r1", "conversations": [{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value", "image_tags", "1 <image> tags but 0 image"),
    ("not an object", ["a", "b"], "-", "wrong_type", "JSON object"),
]


@pytest.mark.parametrize("name,data,field,kind,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_id_field_reason(folder: Path, name: str, data, field: str, kind: str, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        check(data, folder)
    err = info.value
    assert isinstance(err, VituneError)
    assert (err.field, err.kind) == (field, kind), str(err)
    assert reason in err.reason
    text = str(err)
    assert "train.json" in text and f"field '{field}'" in text
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        assert f"record '{data['id']}'" in text
    else:
        assert "record #3" in text


def test_images_without_tags_go_first(folder: Path) -> None:
    spec = check(good(image=["images/a.png", "images/b.jpg"], conversations=[{"from": "human", "value": "compare"}, {"from": "gpt", "value": "x"}]), folder)
    assert spec.messages[0].content == "<image>\n<image>\ncompare"
    assert len(spec.images) == 2


def test_messages_format(folder: Path) -> None:
    rec = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "red."}]}],
           "images": ["images/a.png"]}
    spec = check(rec, folder)
    assert spec.messages[0].content == "<image>\nwhat color?"
    assert spec.images == [folder / "images" / "a.png"]
    with pytest.raises(RecordError) as info:
        check({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
                            {"role": "assistant", "content": "a"}], "images": ["images/a.png"]}, folder)
    assert info.value.field == "images" and "2 <image> tags but 1 image" in info.value.reason
    with pytest.raises(RecordError) as info:
        check({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, folder)
    assert info.value.field == "messages[1].content" and info.value.kind == "wrong_type"


def test_jsonl_bad_line_is_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good()) + "\n{not json\n\n" + json.dumps(good(id="r2")) + "\n")
    raws = list(read_records(path))
    assert len(raws) == 3
    assert raws[1].parse_error and "line 2" in raws[1].parse_error
    with pytest.raises(RecordError) as info:
        check_record(raws[1], "auto", tmp_path)
    assert info.value.kind == "invalid_json"


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    from vitune.processor import LlavaProcessor

    return LlavaProcessor.from_pretrained(tiny_model_dir)


def test_skip_mode_quarantines_and_counts(folder: Path, processor, tmp_path: Path) -> None:
    records = [good(id="ok1"), good(id="gone", image="images/nope.png"), good(id="ok2"),
               good(id="broken", image="images/broken.png"),
               good(id="empty", conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": ""}]),
               {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello."}]}]
    data_path = folder / "mixed.json"
    data_path.write_text(json.dumps(records))
    with pytest.raises(RecordError) as info:
        prepare_data([data_path], processor, processor.template, 512, on_bad_record="error")
    assert "record 'gone'" in str(info.value) and "image file not found" in str(info.value)

    qpath = tmp_path / "quarantine.jsonl"
    q = Quarantine(qpath)
    data = prepare_data([data_path], processor, processor.template, 512, on_bad_record="skip", quarantine=q)
    q.close()
    assert data.record_ids == ["'ok1'", "'ok2'", "'text'"]
    assert data.num_records == 6 and len(data) + sum(data.skipped.values()) == data.num_records
    assert data.skipped == {"image_missing": 1, "image_undecodable": 1, "empty_turn": 1}
    lines = [json.loads(x) for x in qpath.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["'gone'", "'broken'", "'empty'"]
    assert lines[0]["field"] == "image" and "not found" in lines[0]["reason"]
    assert lines[0]["record"]["image"] == "images/nope.png"  # the record itself, to fix and retry
    assert lines[2]["field"] == "conversations[1].value"
    assert list(data.has_image) == [True, True, False]


def test_preparation_is_lazy(folder: Path, processor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up front, image files are only opened for their header, never decoded into pixels."""
    import vitune.data.dataset as ds
    import vitune.data.records as rec

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded during preparation")

    monkeypatch.setattr(ds, "load_image", no_decoding)
    monkeypatch.setattr(rec, "load_image", no_decoding)
    path = folder / "lazy.json"
    path.write_text(json.dumps([good(id=str(i)) for i in range(5)]))
    data = prepare_data([path], processor, processor.template, 512)
    assert len(data) == 5 and data.image_paths == [str(folder / "images" / "a.png")]
