"""The synthetic world's scenes: schema, determinism, and captions that are true of their scene.

The caption checker below parses captions with its own regular expressions and checks each claim
against the instances (through `scene.position_phrase` / `scene.relation`, the definitions of
"where" and "left of"); it shares no code with the caption generator.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vitune.errors import VituneError
from vitune.world.captions import FAMILIES, NEGATIVE_KINDS, caption, hard_negative
from vitune.world.render import SPLITS, render_world
from vitune.world.scene import (
    COLORS,
    SHAPES,
    SIZES,
    Instance,
    Scene,
    horizontal_position,
    position_phrase,
    read_scenes,
    relation,
    vertical_position,
)

NUM = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six"])} | {"a": 1}
OBJ = rf"(?:an? |the )?(?:(small|large) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
WHERE = r"(in the center|at the top left|at the top right|at the bottom left|at the bottom right|at the top|at the bottom|on the left|on the right)"
REL = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}


def _where(inst: Instance) -> str:
    p = position_phrase(inst)
    return "in the center" if p == "center" else (f"on the {p}" if p in ("left", "right") else f"at the {p}")


def _items(text: str) -> list[str]:
    """'a, b and c' -> ['a', 'b', 'c']."""
    head, _, last = text.rpartition(" and ")
    return [*(s.strip() for s in head.split(",") if s.strip()), last.strip()] if head else [text.strip()]


def _singular(noun: str, count: int) -> str:
    return noun if count == 1 else noun.removesuffix("es" if noun.endswith("sses") else "s")


def _mention(text: str) -> tuple[str | None, str, str, str | None]:
    m = re.fullmatch(OBJ + rf"(?: {WHERE})?", text.strip())
    assert m, f"not an object mention: {text!r}"
    return m.group(1), m.group(2), m.group(3), m.group(4)


def _fits(mention: tuple[str | None, str, str, str | None], inst: Instance) -> bool:
    size, color, shape, where = mention
    return (
        inst.category == shape
        and inst.color == color
        and (size is None or inst.size == size)
        and (where is None or _where(inst) == where)
    )


def _lists_exactly(mentions: list, instances: tuple[Instance, ...], axis: int | None = None) -> bool:
    """Mentions name each instance once (in order of their centres along `axis`, if given)."""
    if len(mentions) != len(instances):
        return False
    for perm in itertools.permutations(instances):
        if all(_fits(m, i) for m, i in zip(mentions, perm)):
            xs = [i.center[axis or 0] for i in perm]
            if axis is None or xs == sorted(xs):
                return True
    return False


def caption_is_true(text: str, instances: tuple[Instance, ...]) -> bool:
    n = len(instances)
    if m := re.fullmatch(rf"(?:There (?:is|are) |The image shows |)({'|'.join(NUM)}) (?:single )?(?:objects?|shapes?): (.*)\.", text, re.I):
        return NUM[m.group(1).lower()] == n and _lists_exactly([_mention(s) for s in _items(m.group(2))], instances)
    if m := re.fullmatch(r"From (left to right|top to bottom): (.*)\.", text):
        axis = 0 if m.group(1) == "left to right" else 1
        lines = {(horizontal_position if axis == 0 else vertical_position)(i) for i in instances}
        return len(lines) == n and _lists_exactly([_mention(s) for s in _items(m.group(2))], instances, axis=axis)
    if m := re.fullmatch(r"(?:Large shapes: ([^.]*)\.)? ?(?:Small shapes: ([^.]*)\.)?", text):
        mentions = [(size, *_mention(s)[1:]) for size, g in zip(SIZES[::-1], m.groups()) if g for s in _items(g)]
        return _lists_exactly(mentions, instances)
    if m := re.fullmatch(rf"Just ({OBJ}), {WHERE}\.", text):
        mention = _mention(m.group(1))
        return n == 1 and _fits((*mention[:3], m.group(5)), instances[0])
    if m := re.fullmatch(rf"({OBJ}) is alone {WHERE} of the image\.", text, re.I):
        mention = _mention(m.group(1)[0].lower() + m.group(1)[1:])
        return n == 1 and _fits((*mention[:3], m.group(5)), instances[0])
    if m := re.fullmatch(r"(?:In this picture, |We can see |)(.*)\.", text, re.I) and re.search(WHERE, text) and " is " not in text:
        body = re.sub(r"^(In this picture, |We can see )", "", text[:-1], flags=re.I)
        return _lists_exactly([_mention(s[0].lower() + s[1:]) for s in _items(body)], instances)
    if m := re.fullmatch(r"(?:The image contains |There (?:is|are) |In total: )(.*)\.", text):
        parts = [p.split() for p in _items(m.group(1))]
        if all(len(p) == 2 for p in parts):  # 'two circles'
            counts = Counter(i.category for i in instances)
            claimed = {_singular(p[1], NUM[p[0]]): NUM[p[0]] for p in parts}
        else:  # 'two red objects'
            counts = Counter(i.color for i in instances)
            claimed = {p[1]: NUM[p[0]] for p in parts}
        return claimed == dict(counts)
    if m := re.fullmatch(r"The (\w+) objects are close together\.", text):
        return NUM[m.group(1)] == n
    sentences = re.findall(r"[^.]+\.", text)
    if sentences and all(" is " in s for s in sentences):
        for s in sentences:
            m = re.fullmatch(rf"\s*({OBJ}) is ({'|'.join(REL)}) ({OBJ})\.", s, re.I)
            assert m, f"not a relation sentence: {s!r}"
            left, right = _mention(m.group(1).lower()), _mention(m.group(6))
            rel = REL[m.group(5)]
            if not any(
                _fits(left, a) and _fits(right, b) and relation(a, b) == rel
                for a, b in itertools.permutations(instances, 2)
            ):
                return False
            for phrase, mention in ((m.group(1).lower(), left), (m.group(6), right)):
                if phrase.startswith("the ") and sum(_fits(mention, i) for i in instances) != 1:
                    return False  # 'the red circle' must be the only one
        return True
    raise AssertionError(f"caption in no known form: {text!r}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    render_world(out, scenes=300, eval_scenes=40, seed=7, size=48)
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_schema(world: Path) -> None:
    counts = {split: 0 for split in SPLITS}
    for split in SPLITS:
        for line in (world / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert set(record) == {"id", "image", "captions", "instances"}
            assert record["image"] == f"images/{record['id']}.png" and record["id"].startswith(split)
            assert len(record["captions"]) == 5 and len(set(record["captions"])) == 5
            assert 1 <= len(record["instances"]) <= 4
            for inst in record["instances"]:
                assert set(inst) == {"category", "bbox", "color", "size"}
                assert inst["category"] in SHAPES and inst["color"] in COLORS and inst["size"] in SIZES
                x1, y1, x2, y2 = inst["bbox"]
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            image = Image.open(world / record["image"])
            assert image.size == (48, 48) and image.mode == "RGB"
            counts[split] += 1
    assert counts == {"train": 300, "val": 40, "test": 40}
    assert json.loads((world / "world.json").read_text())["shapes"] == list(SHAPES)


def test_no_object_hides_another(world: Path) -> None:
    for scene in read_scenes(world / "train.jsonl"):
        for a, b in itertools.combinations(scene.instances, 2):
            ix = min(a.bbox[2], b.bbox[2]) - max(a.bbox[0], b.bbox[0])
            iy = min(a.bbox[3], b.bbox[3]) - max(a.bbox[1], b.bbox[1])
            assert ix <= 0 or iy <= 0, f"{scene.id}: boxes overlap"


def test_relation_is_said_only_when_it_is_the_one_true_answer() -> None:
    def at(x: float, y: float) -> Instance:
        return Instance("circle", (x - 0.05, y - 0.05, x + 0.05, y + 0.05))

    origin = at(0.5, 0.5)
    assert relation(at(0.2, 0.5), origin) == "left of" and relation(at(0.5, 0.9), origin) == "below"
    assert relation(at(0.2, 0.4), origin) == "left of"  # 0.3 across against 0.1 down: clearly left
    assert relation(at(0.2, 0.22), origin) is None  # 0.30 left and 0.28 above: both are true
    assert relation(at(0.55, 0.53), origin) is None  # too close to say


def test_variety(world: Path) -> None:
    scenes = list(read_scenes(world / "train.jsonl"))
    insts = [i for s in scenes for i in s.instances]
    assert set(Counter(i.category for i in insts)) == set(SHAPES)
    assert set(Counter(i.color for i in insts)) == set(COLORS)
    assert set(Counter(position_phrase(i) for i in insts)) >= {"center", "top left", "bottom right", "left", "top"}
    assert set(Counter(len(s.instances) for s in scenes)) == {1, 2, 3, 4}


def test_pixels_show_the_objects(world: Path) -> None:
    """The colour of each object is what the record says, at its box centre (shapes are filled)."""
    from vitune.world.render import RGB

    for scene in itertools.islice(read_scenes(world / "val.jsonl"), 40):
        image = Image.open(world / scene.image)
        for inst in scene.instances:
            if inst.category in ("star", "triangle"):
                continue  # the box centre of a star or triangle can fall on the background
            cx, cy = inst.center
            pixel = image.getpixel((int(cx * 48), int(cy * 48)))
            nearest = min(RGB, key=lambda c: sum((p - q) ** 2 for p, q in zip(pixel, RGB[c])))
            assert nearest == inst.color, f"{scene.id}: {inst} looks {nearest}"


def test_deterministic(world: Path, tmp_path: Path) -> None:
    render_world(tmp_path / "a", scenes=300, eval_scenes=40, seed=7, size=48, workers=1)
    assert _digest(tmp_path / "a") == _digest(world)
    render_world(tmp_path / "b", scenes=300, eval_scenes=40, seed=8, size=48, workers=1)
    assert (tmp_path / "b" / "train.jsonl").read_bytes() != (world / "train.jsonl").read_bytes()


def test_parallel_render_is_byte_identical(tmp_path: Path) -> None:
    render_world(tmp_path / "one", scenes=700, eval_scenes=0, seed=1, size=32, workers=1)
    render_world(tmp_path / "two", scenes=700, eval_scenes=0, seed=1, size=32, workers=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


def test_every_caption_is_true(world: Path) -> None:
    for split in SPLITS:
        for scene in read_scenes(world / f"{split}.jsonl"):
            for text in scene.captions:
                assert caption_is_true(text, scene.instances), f"{scene.id}: false caption {text!r}"


def test_checker_catches_false_captions(world: Path) -> None:
    """Hard negatives (one shape, colour, place or relation changed) are false, and the checker says so."""
    rng = random.Random(0)
    checked = 0
    for scene in read_scenes(world / "train.jsonl"):
        for family in range(len(FAMILIES)):
            seed = rng.getrandbits(32)
            assert caption_is_true(caption(scene.instances, family, seed), scene.instances)
            for kind in NEGATIVE_KINDS:
                fake = hard_negative(scene.instances, family, seed, kind, rng)
                if fake is not None:
                    assert not caption_is_true(fake, scene.instances), f"{scene.id}: negative {fake!r} is true"
                    checked += 1
    assert checked > 1000


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(VituneError, match="--size"):
        render_world(tmp_path, scenes=1, eval_scenes=1, seed=0, size=4)
    with pytest.raises(VituneError, match="--scenes"):
        render_world(tmp_path, scenes=0, eval_scenes=1, seed=0, size=48)


def test_cli_render(tmp_path: Path) -> None:
    import argparse

    from vitune.world import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "render", "--out", str(tmp_path), "--scenes", "5", "--eval-scenes", "2", "--size", "40"])
    assert args.func(args) == 0
    scenes = list(read_scenes(tmp_path / "test.jsonl"))
    assert len(scenes) == 2 and isinstance(scenes[0], Scene)
    assert Image.open(tmp_path / scenes[0].image).size == (40, 40)
