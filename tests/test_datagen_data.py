"""COCO -> annotations, the teacher's context text, stage-1 caption data and the response parser."""

from __future__ import annotations

import csv
import json
import random

import pytest

from vitune.datagen.captions import caption_samples, concept_filter, noun_phrases, read_pairs
from vitune.datagen.commands import main
from vitune.datagen.context import coco_to_annotations, context_text
from vitune.datagen.parse import ParseError, parse_response
from vitune.datagen.teachers import available_versions, build_messages, load_prompt
from vitune.errors import VituneError
from vitune.world.scene import Instance, Scene, read_scenes

COCO_CAPTIONS = {
    "images": [
        {"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480},
        {"id": 25, "file_name": "000000000025.jpg", "width": 200, "height": 100},
        {"id": 30, "file_name": "000000000030.jpg", "width": 100, "height": 100},
    ],
    "annotations": [
        {"id": 1, "image_id": 9, "caption": "A plate  of food with broccoli.\n"},
        {"id": 2, "image_id": 9, "caption": "Some food on a table."},
        {"id": 3, "image_id": 25, "caption": "A giraffe eating leaves."},
    ],
}
COCO_INSTANCES = {
    "images": COCO_CAPTIONS["images"],
    "categories": [{"id": 1, "name": "broccoli"}, {"id": 2, "name": "giraffe"}, {"id": 3, "name": "dining table"}],
    "annotations": [
        {"id": 10, "image_id": 9, "category_id": 1, "bbox": [64, 48, 320, 240], "iscrowd": 0},
        {"id": 11, "image_id": 9, "category_id": 3, "bbox": [0, 0, 700, 480], "iscrowd": 0},
        {"id": 12, "image_id": 25, "category_id": 2, "bbox": [20, 10, 100, 50], "iscrowd": 0},
        {"id": 13, "image_id": 30, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 0},
    ],
}


def test_coco_to_annotations_normalises_boxes():
    records = coco_to_annotations(COCO_CAPTIONS, COCO_INSTANCES, image_prefix="val2014/")
    assert [r["id"] for r in records] == ["000000000009", "000000000025"]  # image 30 has no caption
    first = records[0]
    assert first["image"] == "val2014/000000000009.jpg"
    assert first["captions"] == ["A plate of food with broccoli.", "Some food on a table."]
    assert first["instances"][0] == {"category": "broccoli", "bbox": [0.1, 0.1, 0.6, 0.6]}
    assert first["instances"][1]["bbox"] == [0.0, 0.0, 1.0, 1.0]  # clipped to the image
    assert records[1]["instances"] == [{"category": "giraffe", "bbox": [0.1, 0.1, 0.6, 0.6]}]


def test_context_command_and_context_text(tmp_path):
    (tmp_path / "caps.json").write_text(json.dumps(COCO_CAPTIONS))
    (tmp_path / "inst.json").write_text(json.dumps(COCO_INSTANCES))
    out = tmp_path / "ann.jsonl"
    assert main(["context", "--coco-captions", str(tmp_path / "caps.json"), "--coco-instances",
                 str(tmp_path / "inst.json"), "--out", str(out)]) == 0
    scenes = list(read_scenes(out))
    assert len(scenes) == 2
    assert context_text(scenes[0]) == (
        "A plate of food with broccoli.\nSome food on a table.\n\n"
        "broccoli: [0.100, 0.100, 0.600, 0.600]\ndining table: [0.000, 0.000, 1.000, 1.000]"
    )
    world = Scene("w", "w.png", ("A red circle.",), (Instance("circle", (0.1, 0.2, 0.3, 0.4), "red", "small"),))
    assert context_text(world).endswith("small red circle: [0.100, 0.200, 0.300, 0.400]")
    assert context_text(world, attributes=False).endswith("\ncircle: [0.100, 0.200, 0.300, 0.400]")


def test_coco_errors_name_the_record(tmp_path, capsys):
    bad = {"images": COCO_CAPTIONS["images"], "annotations": [{"id": 1, "image_id": 77, "caption": "x"}]}
    with pytest.raises(VituneError, match=r"annotations\[0\]: image_id 77"):
        coco_to_annotations(bad)
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["context", "--coco-captions", str(tmp_path / "broken.json"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err


def test_prompts_are_versioned_files_with_examples():
    for kind in ("conversation", "detail", "complex"):
        assert available_versions(kind) == ["v1"]
        prompt = load_prompt(kind)
        assert prompt.tag == f"{kind}/v1" and prompt.system and len(prompt.examples) >= 2
        messages = build_messages(prompt, "CONTEXT")
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(prompt.examples) + ["user"]
        # the hand-written examples pass the same validation as the teacher's answers
        for _, response in prompt.examples:
            parse_response(kind, response)
    assert len(load_prompt("detail").instructions) >= 10
    assert len(load_prompt("brief").instructions) >= 10
    with pytest.raises(VituneError, match="no prompt version 'v9'"):
        load_prompt("conversation", "v9")


@pytest.mark.parametrize(
    "kind, text, reason",
    [
        ("conversation", "   ", "empty"),
        ("conversation", "I'm sorry, I cannot describe this image.", "refusal"),
        ("conversation", "Question:\nWhat is it?\n===\nAnswer:\nAs an AI, I cannot see images.\n===", "refusal"),
        ("conversation", "What a nice picture.", "unparseable"),
        ("conversation", "Answer:\nRed.\n===\nQuestion:\nWhat color?\n===", "wrong_turn_structure"),
        ("conversation", "Question:\nWhat color?\n===", "wrong_turn_structure"),
        ("conversation", "Question:\nWhat color?\n===\nAnswer:\n\n===", "wrong_turn_structure"),
        ("complex", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.\n===", "wrong_turn_structure"),
        ("conversation", "Question:\nWhere?\n===\nAnswer:\nAccording to the description provided, at the top.\n===", "leaked_context"),
        ("detail", "The circle at coordinates [0.1, 0.2] is red and sits close to the square in the corner of the picture.", "leaked_context"),
        ("detail", "A red circle.", "too_short"),
        ("detail", "Question:\nWhat?\n===\nAnswer:\nA long answer that goes on and on about the image in detail.", "wrong_turn_structure"),
    ],
)
def test_parse_rejects_with_reason(kind, text, reason):
    with pytest.raises(ParseError) as info:
        parse_response(kind, text)
    assert info.value.reason == reason


def test_parse_accepts_label_variants():
    text = "**Question:** How many?\n**Answer:** Two shapes,\nboth red.\n\nQuestion: Where?\nAnswer: At the top."
    turns = parse_response("conversation", text)
    assert [(t.role, t.text) for t in turns] == [
        ("human", "How many?"), ("gpt", "Two shapes,\nboth red."), ("human", "Where?"), ("gpt", "At the top."),
    ]
    with pytest.raises(ParseError, match="truncated"):
        parse_response("conversation", text, finish_reason="length")


def test_read_pairs_jsonl_and_csv(tmp_path):
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"image": "a.png", "caption": "A dog."}\n{"id": "b", "image": "b.png", "captions": ["One.", "Two."]}\n')
    pairs = read_pairs(jl)
    assert [(p.image, p.caption) for p in pairs][0] == ("a.png", "A dog.")
    assert pairs[1].caption in ("One.", "Two.") and len(pairs) == 2
    assert len(read_pairs(jl, all_captions=True)) == 3
    cs = tmp_path / "pairs.csv"
    with cs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow(["c.png", "A cat on a mat."])
    assert [(p.image, p.caption) for p in read_pairs(cs)] == [("c.png", "A cat on a mat.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    with pytest.raises(VituneError, match=r"bad.jsonl:1: missing field 'caption'"):
        read_pairs(bad)


def test_caption_samples_use_many_brief_phrasings(tmp_path):
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"Caption {i}."}) + "\n" for i in range(300)))
    samples = caption_samples(read_pairs(jl), seed=1)
    instructions = {s["conversations"][0]["value"] for s in samples}
    assert len(instructions) >= 10
    assert all(v.startswith("<image>\n") for v in instructions)
    assert samples[5]["conversations"][1] == {"from": "gpt", "value": "Caption 5."}
    assert samples[0]["kind"] == "brief" and samples[0]["prompt_version"] == "brief/v1"
    mixed = caption_samples(read_pairs(jl), seed=1, image_position="random")
    assert any(s["conversations"][0]["value"].endswith("\n<image>") for s in mixed)


def test_noun_phrases_normalise():
    assert noun_phrases("Two brown dogs are chasing a red ball in the park.") == {"brown dog", "red ball", "park"}
    assert noun_phrases("The dog sleeps.") == {"dog"}


def test_concept_filter_drops_rare_and_caps_frequent():
    rng = random.Random(0)
    captions = [f"A dog plays with a ball number {i}." for i in range(30)]  # dog, ball: frequent
    captions += ["A zebra stands near a tower."]  # zebra, tower: seen once -> dropped
    captions += ["A cat on a sofa."] * 3  # cat, sofa: exactly min_count -> kept
    rng.shuffle(captions)
    keep, report = concept_filter(captions, min_count=3, max_per_phrase=10, seed=0)
    kept = [captions[i] for i in keep]
    assert "A zebra stands near a tower." not in kept
    assert kept.count("A cat on a sofa.") == 3
    dogs = [c for c in kept if "dog" in c]
    assert 10 <= len(dogs) <= 20  # at most 10 via "dog" and 10 via "ball"
    assert report.rare_phrases >= 2 and report.capped_phrases >= 2 and report.kept == len(keep)


def test_captions_command(tmp_path):
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"image": f"{i}.png", "caption": "A red circle on a grey background."}) + "\n"
                          for i in range(5)))
    out = tmp_path / "stage1.json"
    assert main(["captions", "--input", str(jl), "--out", str(out), "--filter", "--min-count", "3"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 5 and all(d["conversations"][1]["value"] == "A red circle on a grey background." for d in data)
    (tmp_path / "caps.json").write_text(json.dumps(COCO_CAPTIONS))
    out2 = tmp_path / "coco.jsonl"
    assert main(["captions", "--coco-captions", str(tmp_path / "caps.json"), "--out", str(out2), "--all-captions"]) == 0
    assert len(out2.read_text().splitlines()) == 3
