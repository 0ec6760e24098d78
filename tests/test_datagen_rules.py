"""The rules teacher and the shared question generator: every answer is true of its scene.

Truth is checked here against the annotation record (plain dicts) with this file's own geometry,
not with the code under test: each answer's facts must hold, each fact must be stated in the
answer's words, and every object an answer names must exist (or be explicitly hypothetical).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from vitune.datagen import rules
from vitune.datagen.parse import parse_response
from vitune.errors import VituneError
from vitune.world.questions import (
    QUESTION_TYPES,
    SHORT_ANSWER_SUFFIX,
    chance_level,
    questions_of_type,
    short_answer_questions,
)
from vitune.world.scene import COLORS, SHAPES, SIZES, Instance, Scene

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


# -- scenes ------------------------------------------------------------------------------------


def random_scene(rng: random.Random, index: int) -> Scene:
    """Harder than the world's layouts: repeated colours/shapes, objects anywhere, 0-6 of them."""
    n = rng.choice([0, 1, 2, 2, 3, 3, 4, 4, 5, 6])
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    colors = rng.sample(COLORS, rng.randint(1, 3))
    insts = []
    for _ in range(n):
        w = rng.uniform(0.08, 0.3)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - w)
        insts.append(Instance(rng.choice(shapes), (x, y, x + w, y + w), rng.choice(colors), rng.choice(SIZES)))
    scene = Scene(f"s{index}", f"images/s{index}.png", ("caption",), tuple(insts))
    return Scene.from_json(scene.to_json())  # as read from an annotations file (3-decimal boxes)


SCENES = [random_scene(random.Random(i), i) for i in range(400)]


# -- the independent checker -------------------------------------------------------------------


def record(scene: Scene) -> list[dict]:
    return scene.to_json()["instances"]


def center(inst: dict) -> tuple[float, float]:
    x1, y1, x2, y2 = inst["bbox"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def grid(inst: dict) -> str:
    x, y = center(inst)
    col = ["left", "center", "right"][min(int(x * 3), 2)]
    row = ["top", "middle", "bottom"][min(int(y * 3), 2)]
    if (col, row) == ("center", "middle"):
        return "center"
    if col == "center":
        return row
    if row == "middle":
        return col
    return f"{row} {col}"


def rel(a: dict, b: dict) -> str | None:
    (ax, ay), (bx, by) = center(a), center(b)
    dx, dy = ax - bx, ay - by
    if max(abs(dx), abs(dy)) < 0.1:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def matching(insts: list[dict], sel: dict) -> list[dict]:
    return [i for i in insts if all(i.get(k) == v for k, v in sel.items())]


def one(insts: list[dict], sel: dict) -> dict:
    found = matching(insts, sel)
    assert len(found) == 1, f"selector {sel} names {len(found)} objects, not exactly one"
    return found[0]


def coordinate(inst: dict, direction: str) -> float:
    x, y = center(inst)
    return {"up": -y, "down": y, "left": -x, "right": x}[direction]


def fact_holds(insts: list[dict], fact: rules.Fact) -> bool:
    k, a = fact.kind, fact.args
    if k == "count":
        return len(matching(insts, a[0])) == a[1]
    if k == "attr":
        return one(insts, a[0]).get(a[1]) == a[2]
    if k == "position":
        return grid(one(insts, a[0])) == a[1]
    if k == "exists_at":
        return any(grid(i) == a[1] for i in matching(insts, a[0]))
    if k == "relation":
        return rel(one(insts, a[0]), one(insts, a[1])) == a[2]
    if k == "exists":
        return bool(matching(insts, a[0])) == a[1]
    if k == "further":
        return coordinate(one(insts, a[0]), a[2]) - coordinate(one(insts, a[1]), a[2]) >= 0.1 - 1e-9
    if k == "extreme":
        best = one(insts, a[0])
        return all(coordinate(best, a[1]) - coordinate(o, a[1]) >= 0.1 - 1e-9 for o in insts if o is not best)
    if k == "nearest":
        src, near = one(insts, a[0]), one(insts, a[1])
        d = math.dist(center(src), center(near))
        return all(math.dist(center(src), center(o)) - d >= 0.1 - 1e-9 for o in insts if o is not src and o is not near)
    if k == "mirror_position":
        inst = dict(one(insts, a[0]))
        x1, y1, x2, y2 = inst["bbox"]
        inst["bbox"] = [1 - x2, y1, 1 - x1, y2] if a[1] == "horizontal" else [x1, 1 - y2, x2, 1 - y1]
        return grid(inst) == a[2]
    if k == "color_set":
        return {i["color"] for i in insts} == set(a[0])
    if k == "distinct":
        values = [i.get(a[0]) for i in insts]
        return len(values) == len(set(values))
    if k == "majority":
        counts = Counter(i.get(a[0]) for i in insts).most_common()
        return counts[0][0] == a[1] and (len(counts) == 1 or counts[0][1] > counts[1][1])
    if k == "arithmetic":
        x, op, y, result = a
        return (x + y if op == "+" else x - y) == result and result >= 0
    raise AssertionError(f"unknown fact kind {k}")


def stated(fact: rules.Fact, text: str) -> bool:
    """The fact's value is in the answer's words."""
    k, a = fact.kind, fact.args
    low = text.lower()
    if k == "count":
        n = a[1]
        return re.search(rf"\b({n}|{NUMBER_WORDS[n]})\b", low) is not None or (n == 1 and re.search(r"\b(a|an|single|only)\b", low) is not None) or (n == 0 and " no " in f" {low} ") or (n == 2 and "both" in low)
    if k == "attr":
        return a[2] in low
    if k in ("position", "exists_at"):
        return a[1] in low or (a[1] == "center" and "center" in low)
    if k == "relation":
        return a[2] in low
    if k == "exists":
        return low.startswith("yes") if a[1] else (low.startswith("no") or " no " in low or "don't" in low)
    if k == "mirror_position":
        return a[2] in low
    if k == "color_set":
        return all(c in low for c in a[0])
    if k == "majority":
        return a[1] in low
    if k == "arithmetic":
        zero = a[3] == 0 and re.search(r"\b(no|none)\b", low) is not None
        return zero or re.search(rf"\b({a[3]}|{NUMBER_WORDS[a[3]] if a[3] <= 10 else a[3]})\b", low) is not None
    return True  # further / extreme / nearest / distinct: checked by their objects' names below


NAME = re.compile(
    rf"\b(?:(?:{'|'.join(SIZES)}) )?((?:{'|'.join(COLORS)}) )?({'|'.join(SHAPES)})(e?s)?\b"
)
DEFINITE = re.compile(rf"\bthe ((?:(?:{'|'.join(SIZES)}) )?(?:(?:{'|'.join(COLORS)}) )?(?:{'|'.join(SHAPES)}|object))\b(?!e?s\b)")


def mentioned_objects_exist(insts: list[dict], text: str, allowed: list[str]) -> None:
    low = text.lower()
    for m in NAME.finditer(low):
        color, shape = (m.group(1) or "").strip(), m.group(2)
        if any(m.group(0) in a or a in m.group(0) for a in allowed):
            continue
        sel = {"category": shape, **({"color": color} if color else {})}
        # "no circles", "fewer squares": a plural after a count of zero is not a claim of existence
        before = low[max(0, m.start() - 12): m.start()]
        if not matching(insts, sel) and not re.search(r"\b(no|zero|any|many|more|fewer)\s+$", before):
            raise AssertionError(f"{m.group(0)!r} is named but not in the scene: {text!r}")
    for m in DEFINITE.finditer(low):
        words = m.group(1).split()
        sel = {}
        for w in words:
            sel["size" if w in SIZES else "color" if w in COLORS else "category"] = w
        if sel.get("category") == "object":
            del sel["category"]
        if " ".join(words) in ("object",):
            continue
        if any(" ".join(words) in a for a in allowed):
            continue
        assert len(matching(insts, sel)) == 1, f"'the {m.group(1)}' is not one object in the scene: {text!r}"


def check_sample(scene: Scene, sample: rules.RulesSample) -> None:
    insts = record(scene)
    roles = [t.role for t in sample.turns]
    assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
    gpt_turns = [t for t in sample.turns if t.role == "gpt"]
    assert len(sample.facts) == len(gpt_turns) == len(sample.hypothetical)
    for i, (turn, facts, allowed) in enumerate(zip(gpt_turns, sample.facts, sample.hypothetical)):
        question = sample.turns[2 * i].text
        assert turn.text.strip() and question.strip()
        assert facts, f"an answer with no checkable claim: {turn.text!r}"
        for fact in facts:
            assert fact_holds(insts, fact), f"false: {fact} in {turn.text!r} (scene {insts})"
            assert stated(fact, turn.text), f"{fact} is not what {turn.text!r} says"
        mentioned_objects_exist(insts, turn.text, allowed)
        if question.endswith(SHORT_ANSWER_SUFFIX):
            assert len(turn.text.split()) <= 2 and turn.text == turn.text.lower()


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", rules.KINDS)
def test_every_rules_answer_is_true_of_its_scene(kind):
    for i, scene in enumerate(SCENES):
        for variant in range(2):
            sample = rules.generate(scene, kind, random.Random(f"{i}/{variant}"), ["Describe the image in detail."])
            assert sample.kind == kind
            check_sample(scene, sample)


def test_rules_output_passes_the_openai_parser_rules():
    # the same validation the LLM teacher's output goes through: no leaks, no refusals, structure
    for i, scene in enumerate(SCENES[:100]):
        for kind in rules.KINDS:
            sample = rules.generate(scene, kind, random.Random(i), ["Describe the image in detail."])
            if kind == "detail" and len(sample.turns[1].text.split()) < 15:
                continue  # one-object scenes give short descriptions; the LLM threshold is for GPT-4 prose
            text = sample.turns[1].text if kind == "detail" else "\n".join(
                f"{'Question' if t.role == 'human' else 'Answer'}:\n{t.text}\n===" for t in sample.turns
            )
            turns = parse_response(kind, text)
            assert [t.text for t in turns] == [t.text for t in (sample.turns[1:] if kind == "detail" else sample.turns)]


def test_rules_data_is_varied():
    questions, answers, reasoners = Counter(), Counter(), Counter()
    for i, scene in enumerate(SCENES):
        for kind in rules.KINDS:
            sample = rules.generate(scene, kind, random.Random(i), ["x"])
            for t in sample.turns:
                (questions if t.role == "human" else answers)[t.text] += 1
    assert len(questions) > 800 and len(answers) > 1000
    # no single answer dominates (bare short answers like "yes" are expected to repeat)
    assert answers.most_common(1)[0][1] < 0.05 * sum(answers.values())
    # complex questions use several reasoning patterns
    for i, scene in enumerate(SCENES):
        q = rules.generate(scene, "complex", random.Random(i)).turns[0].text
        reasoners[q.split()[0]] += 1
    assert len(reasoners) >= 5


def test_conversation_includes_bare_short_answers_of_every_type():
    covered = Counter()
    for i, scene in enumerate(SCENES):
        sample = rules.generate(scene, "conversation", random.Random(i))
        for j, q in enumerate(sample.turns[::2]):
            if q.text.endswith("\n" + SHORT_ANSWER_SUFFIX):
                fact = sample.facts[j][0]
                covered[fact.args[1] if fact.kind == "attr" else fact.kind] += 1
    # color, shape (attr), count, position, existence, relation: the six toy-vqa types
    assert set(covered) == {"color", "category", "count", "position", "exists", "relation"}


def test_rules_teacher_is_deterministic():
    a = [rules.generate(s, "conversation", random.Random(7)).turns for s in SCENES[:50]]
    b = [rules.generate(s, "conversation", random.Random(7)).turns for s in SCENES[:50]]
    assert a == b
    # a different seed gives different (varied) data for the same scenes
    c = [rules.generate(s, "conversation", random.Random(8)).turns for s in SCENES[:50]]
    assert a != c


# -- the shared short-answer questions ---------------------------------------------------------


def subject_selector(phrase: str) -> dict:
    words = phrase.removeprefix("the ").split()
    sel = {}
    for w in words:
        if w in SIZES:
            sel["size"] = w
        elif w in COLORS:
            sel["color"] = w
        elif w not in ("object", "objects"):
            sel["category"] = w[:-2] if w.endswith("es") and w[:-2] in SHAPES else w.rstrip("s") if w.rstrip("s") in SHAPES else w
    return sel


def test_every_short_answer_is_true_and_unambiguous():
    for i, scene in enumerate(SCENES):
        insts = record(scene)
        for qtype in QUESTION_TYPES:
            for q in questions_of_type(scene, qtype, random.Random(i)):
                assert q.type == qtype and q.answer in q.choices and q.answer == q.answer.lower()
                sel = subject_selector(q.subject)
                if qtype == "count":
                    assert len(matching(insts, sel)) == int(q.answer) >= 1
                elif qtype == "existence":
                    assert bool(matching(insts, sel)) == (q.answer == "yes")
                elif qtype == "relation":
                    assert rel(one(insts, sel), one(insts, subject_selector(q.other))) == q.answer
                elif qtype == "position":
                    assert grid(one(insts, sel)) == q.answer
                elif qtype == "color":
                    assert "color" not in sel and one(insts, sel)["color"] == q.answer
                elif qtype == "shape":
                    assert "category" not in sel and one(insts, sel)["category"] == q.answer
                # the question names its subject, so a reader can resolve it
                assert q.subject in q.question or q.type in ("count", "existence")


def test_short_answer_questions_balanced_existence_and_types():
    answers = Counter()
    types = Counter()
    for i, scene in enumerate(SCENES):
        qs = short_answer_questions(scene, random.Random(i), per_type=2)
        types.update(q.type for q in qs)
        answers.update(q.answer for q in qs if q.type == "existence")
        assert len({q.question for q in qs}) == len(qs)
    assert set(types) == set(QUESTION_TYPES)
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6


def test_short_answer_questions_per_type_mapping():
    """A mapping asks more of some types (the demo's hard ones) and one of every type it leaves out."""
    for i, scene in enumerate(SCENES):
        one = Counter(q.type for q in short_answer_questions(scene, random.Random(i)))
        more = Counter(q.type for q in short_answer_questions(scene, random.Random(i), per_type={"relation": 3, "position": 2}))
        for t in ("color", "shape", "count", "existence"):
            assert more[t] == one[t] <= 1
        possible = {t: len({q.question for q in questions_of_type(scene, t, random.Random(i))}) for t in ("relation", "position")}
        assert more["relation"] == min(3, possible["relation"]) and more["position"] == min(2, possible["position"])
    with pytest.raises(VituneError, match="unknown type"):
        short_answer_questions(SCENES[0], random.Random(0), per_type={"relations": 2})


def test_chance_levels():
    assert chance_level("existence") == 0.5
    assert chance_level("color") == pytest.approx(1 / len(COLORS))
    assert chance_level("shape") == pytest.approx(1 / len(SHAPES))
    assert chance_level("position") == pytest.approx(1 / 9)
    from vitune.world.questions import MAX_COUNT
    from vitune.world.render import MAX_OBJECTS

    assert chance_level("count") == pytest.approx(1 / MAX_COUNT) and MAX_COUNT == MAX_OBJECTS

    with pytest.raises(VituneError, match="unknown question type"):
        chance_level("colour")


def test_no_question_about_an_ambiguous_object():
    twins = Scene("t", "t.png", (), (
        Instance("circle", (0.1, 0.1, 0.2, 0.2), "red", "small"),
        Instance("circle", (0.7, 0.7, 0.8, 0.8), "red", "small"),
    ))
    for qtype in ("color", "shape", "position", "relation"):
        assert questions_of_type(twins, qtype, random.Random(0)) == []
    counts = questions_of_type(twins, "count", random.Random(0))
    assert counts and all(q.answer == "2" for q in counts)
