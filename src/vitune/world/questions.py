"""Short-answer questions about a scene: the one generator shared by the rules teacher and toy-vqa.

The rules teacher mixes these question/answer pairs into its `conversation` data and the synthetic
world's evaluation (`toy-vqa`) asks them about held-out scenes, so a model trained on the former is
measured on exactly the same phrasings, answer words and reference rules.

Every answer is true of the scene and unambiguous:
- an object is only referred to by a phrase that picks out exactly one instance ("the circle" only
  when the scene has one circle; otherwise "the red circle", "the small red circle", or nothing);
- counts are asked about a shape or a colour present in the scene (answers "1"..MAX_COUNT);
- existence questions come in balanced yes/no cases (an absent shape, colour or colour+shape);
- positions use `position_phrase` (3x3 grid) and relations use `relation`, which rules out pairs
  whose centres are too close to say and near-diagonal pairs (two of the four answers true).

Answers are lowercase single words or short phrases; `choices` is the question type's full answer
set (multiple choice, chance level).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vitune.errors import VituneError
from vitune.world.scene import COLORS, SHAPES, SIZES, Instance, Scene, position_phrase, relation

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "existence", "relation")
SHORT_ANSWER_SUFFIX = "Answer with a single word or phrase."

# Count answers are 1..MAX_COUNT, the synthetic world's most objects per scene (render.MAX_OBJECTS, kept
# equal by a test), so the chance level is that of a guesser who knows the range; larger counts are not asked.
MAX_COUNT = 4
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, MAX_COUNT + 1)),
    "position": POSITIONS,
    "existence": ("yes", "no"),
    "relation": RELATIONS,
}

# Several phrasings per type; `{x}` is a referring phrase ("the red circle"), `{xs}` a plural noun
# phrase ("red circles", "circles", "green objects").
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is {x}?",
        "What is the color of {x}?",
        "Which color does {x} have?",
        "What colour is {x}?",
        "Can you tell me the color of {x}?",
    ),
    "shape": (
        "What shape is {x}?",
        "What is the shape of {x}?",
        "Which shape is {x}?",
        "What kind of shape is {x}?",
    ),
    "count": (
        "How many {xs} are there?",
        "How many {xs} are in the image?",
        "How many {xs} can you see?",
        "What is the number of {xs} in the picture?",
        "Count the {xs}. How many are there?",
    ),
    "position": (
        "Where is {x}?",
        "Where is {x} located in the image?",
        "In which part of the image is {x}?",
        "Where in the picture can {x} be found?",
    ),
    "existence": (
        "Is there {a} in the image?",
        "Are there any {xs} in the picture?",
        "Does the image contain {a}?",
        "Can you see {a}?",
        "Is there {a} anywhere in the scene?",
    ),
    "relation": (
        "Where is {x} relative to {y}?",
        "How is {x} positioned relative to {y}?",
        "Is {x} left of, right of, above or below {y}?",
        "What is the position of {x} with respect to {y}?",
    ),
}


@dataclass(frozen=True)
class Question:
    type: str  # one of QUESTION_TYPES
    question: str  # natural question, varied phrasing
    answer: str  # short lowercase answer: "red", "circle", "3", "yes", "top left", "left of"
    choices: tuple[str, ...]  # the full answer set of this question type
    # What the question is about, for writing a full-sentence answer: a referring phrase
    # ("the red circle"), a plural noun phrase for counts ("red circles"), a noun for existence
    # ("red triangle"); `other` is the second object of a relation question.
    subject: str = field(default="", compare=False)
    other: str = field(default="", compare=False)

    @property
    def short_answer_prompt(self) -> str:
        """The question in the short-answer format (LLaVA-1.5's VQA format) that toy-vqa asks."""
        return f"{self.question}\n{SHORT_ANSWER_SUFFIX}"


def chance_level(question_type: str) -> float:
    """Accuracy of guessing uniformly from the type's answer set (existence 0.5, colour 1/6, ...)."""
    if question_type not in ANSWER_SETS:
        raise VituneError(f"unknown question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}")
    return 1.0 / len(ANSWER_SETS[question_type])


def accuracy_by_type(hits: dict[str, list[bool]]) -> dict:
    """{"accuracy", "chance", "n", "by_type": {TYPE: {"accuracy", "chance", "n"}}} of right/wrong
    answers grouped by question type; the overall chance is the questions' mean chance level."""
    n = sum(len(h) for h in hits.values())
    if not n:
        raise VituneError("no answers to score")
    return {
        "accuracy": sum(sum(h) for h in hits.values()) / n,
        "chance": sum(chance_level(t) * len(h) for t, h in hits.items()) / n,
        "n": n,
        "by_type": {t: {"accuracy": sum(h) / len(h), "chance": chance_level(t), "n": len(h)} for t, h in hits.items() if h},
    }


def plural(noun: str) -> str:
    """English plural of a category noun ('circle' -> 'circles', 'bus' -> 'buses')."""
    irregular = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis"}
    last = noun.split()[-1]
    head = noun[: len(noun) - len(last)]
    if last in irregular:
        return head + irregular[last]
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def referring(
    scene: Scene, inst: Instance, use_color: bool = True, use_category: bool = True
) -> tuple[str, dict[str, str]] | None:
    """The shortest 'the ...' phrase that picks out `inst` alone, with the attributes it uses
    ({"color": "red", "category": "circle"}), or None when no phrase does.

    `use_color=False` is for asking the colour (the phrase must not give it away), `use_category=False`
    for asking the shape (then the noun is 'object')."""
    # colour before size: "the red circle" is how the captions say it
    fields_sets: list[tuple[str, ...]] = [()]
    if use_color:
        fields_sets.append(("color",))
    fields_sets.append(("size",))
    if use_color:
        fields_sets.append(("size", "color"))
    for extra in fields_sets:
        fields = extra + (("category",) if use_category else ())
        if not fields or any(not getattr(inst, f) for f in fields):
            continue
        key = tuple(getattr(inst, f) for f in fields)
        matches = [o for o in scene.instances if tuple(getattr(o, f) for f in fields) == key]
        if len(matches) == 1:
            words = [getattr(inst, f) for f in fields]
            if not use_category:
                words.append("object")
            return "the " + " ".join(words), dict(zip(fields, key))
    return None


def referring_phrase(scene: Scene, inst: Instance, use_color: bool = True, use_category: bool = True) -> str | None:
    """The shortest 'the ...' phrase that picks out `inst` alone ('the red circle'), or None."""
    found = referring(scene, inst, use_color=use_color, use_category=use_category)
    return found[0] if found else None


def _color_questions(scene: Scene, rng: random.Random) -> list[Question]:
    out = []
    for inst in scene.instances:
        if inst.color not in COLORS:
            continue
        ref = referring_phrase(scene, inst, use_color=False)
        if ref:
            q = rng.choice(_TEMPLATES["color"]).format(x=ref)
            out.append(Question("color", q, inst.color, COLORS, subject=ref))
    return out


def _shape_questions(scene: Scene, rng: random.Random) -> list[Question]:
    out = []
    for inst in scene.instances:
        if inst.category not in SHAPES:
            continue
        ref = referring_phrase(scene, inst, use_category=False)
        if ref and ref != "the object":
            q = rng.choice(_TEMPLATES["shape"]).format(x=ref)
            out.append(Question("shape", q, inst.category, SHAPES, subject=ref))
    return out


def _count_questions(scene: Scene, rng: random.Random) -> list[Question]:
    out = []
    by_category = Counter(i.category for i in scene.instances)
    by_color = Counter(i.color for i in scene.instances if i.color)
    by_both = Counter(i.name for i in scene.instances if i.color)
    groups = [(plural(c), n) for c, n in by_category.items()]
    groups += [(f"{c} objects", n) for c, n in by_color.items()]
    # colour+shape counts only when they differ from the shape's count, else they repeat it
    groups += [(plural(name), n) for name, n in by_both.items() if n != by_category[name.split(" ", 1)[1]]]
    for phrase, n in groups:
        if 1 <= n <= MAX_COUNT:
            q = rng.choice(_TEMPLATES["count"]).format(xs=phrase)
            out.append(Question("count", q, str(n), ANSWER_SETS["count"], subject=phrase))
    return out


def _position_questions(scene: Scene, rng: random.Random) -> list[Question]:
    out = []
    for inst in scene.instances:
        ref = referring_phrase(scene, inst)
        if ref:
            q = rng.choice(_TEMPLATES["position"]).format(x=ref)
            out.append(Question("position", q, position_phrase(inst), POSITIONS, subject=ref))
    return out


def _existence_questions(scene: Scene, rng: random.Random) -> tuple[list[Question], list[Question]]:
    """(yes questions, no questions), about shapes, colours and colour+shape combinations."""
    categories = {i.category for i in scene.instances}
    colors = {i.color for i in scene.instances if i.color}
    names = {(i.color, i.category) for i in scene.instances if i.color}
    vocabulary = sorted(set(SHAPES) | categories)
    has_colors = bool(colors) or not scene.instances

    def ask(noun: str, present: bool) -> Question:
        template = rng.choice(_TEMPLATES["existence"])
        q = template.format(a=article(noun), xs=plural(noun))
        return Question("existence", q, "yes" if present else "no", ("yes", "no"), subject=noun)

    yes = [ask(c, True) for c in sorted(categories)]
    no = [ask(c, False) for c in vocabulary if c not in categories]
    if has_colors:
        yes += [ask(f"{c} {s}", True) for c, s in sorted(names)]
        # "no" combinations where the colour or the shape alone is present make the question hard
        no += [
            ask(f"{c} {s}", False)
            for c in COLORS
            for s in SHAPES
            if (c, s) not in names and (c in colors or s in categories)
        ]
        yes += [ask(f"{c} object", True) for c in sorted(colors)]
        no += [ask(f"{c} object", False) for c in COLORS if c not in colors]
    return yes, no


def _relation_questions(scene: Scene, rng: random.Random) -> list[Question]:
    out = []
    insts = list(scene.instances)
    for a in insts:
        for b in insts:
            if a is b:
                continue
            rel = relation(a, b)
            ref_a, ref_b = referring_phrase(scene, a), referring_phrase(scene, b)
            if rel is None or not ref_a or not ref_b:
                continue
            q = rng.choice(_TEMPLATES["relation"]).format(x=ref_a, y=ref_b)
            out.append(Question("relation", q, rel, RELATIONS, subject=ref_a, other=ref_b))
    return out


def questions_of_type(scene: Scene, question_type: str, rng: random.Random) -> list[Question]:
    """Every question of one type that can be asked unambiguously about `scene` (existence: yes
    cases first, then no cases)."""
    if question_type == "existence":
        yes, no = _existence_questions(scene, rng)
        return yes + no
    makers = {
        "color": _color_questions,
        "shape": _shape_questions,
        "count": _count_questions,
        "position": _position_questions,
        "relation": _relation_questions,
    }
    if question_type not in makers:
        raise VituneError(f"unknown question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}")
    return makers[question_type](scene, rng)


def short_answer_questions(
    scene: Scene, rng: random.Random, per_type: int | Mapping[str, int] = 1, types: Sequence[str] = QUESTION_TYPES
) -> list[Question]:
    """Up to `per_type` distinct questions of each type about `scene`, in `types` order (a mapping
    gives each type its own count; the types it does not name get one).

    Existence questions alternate between yes and no, starting with a random one, so the answers
    are balanced over a data set."""
    if not isinstance(per_type, int) and (unknown := set(per_type) - set(QUESTION_TYPES)):
        raise VituneError(f"questions per type: unknown type(s) {', '.join(sorted(unknown))}; known: {', '.join(QUESTION_TYPES)}")
    out: list[Question] = []
    for qtype in types:
        wanted = per_type if isinstance(per_type, int) else per_type.get(qtype, 1)
        if qtype == "existence":
            yes, no = _existence_questions(scene, rng)
            rng.shuffle(yes)
            rng.shuffle(no)
            pools = [yes, no] if rng.random() < 0.5 else [no, yes]
            picked: list[Question] = []
            while len(picked) < wanted and (pools[0] or pools[1]):
                pool = pools[len(picked) % 2] or pools[(len(picked) + 1) % 2]
                picked.append(pool.pop())
            out.extend(picked)
            continue
        pool = questions_of_type(scene, qtype, rng)
        rng.shuffle(pool)
        seen: set[str] = set()
        for q in pool:
            if len(seen) >= wanted:
                break
            if q.question not in seen:
                seen.add(q.question)
                out.append(q)
    return out


# Questions that ask for the whole object phrase back (`named_object_questions`'s "object" kind).
_OBJECT_TEMPLATES: tuple[str, ...] = (
    "What are the color and shape of {x}?",
    "Which color and shape does {x} have?",
    "Name the color and the shape of {x}.",
)
NAMED_KINDS: tuple[str, ...] = ("color", "shape", "object")
# its answer set: every colour-shape pair (a "question type" of its own, not one toy-vqa asks)
_OBJECT_CHOICES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)


def named_object_questions(rng: random.Random, count: int, kinds: Sequence[str] = ("color", "shape")) -> list[Question]:
    """`count` colour and shape questions about an object that the question itself names in full
    ("What color is the small red circle?" -> "red"), in the toy tasks' phrasings: answerable from
    the text alone, with no image.

    They are for instruction tuning, as text-only samples: to answer, the LM has to look back from
    the answer position to the question's object words and carry which words they are, the first of
    the two look-ups every image question needs (the second finds the image token that holds that
    object). Measured on the demo's stage 2, a model that could not bind ("what color is the
    circle?" answered from the whole image) had no first-layer head on the question's object words
    (0.00-0.07 of the answer position's attention) and learned one (0.98) with these samples.

    `kinds` draws from "color", "shape" and "object" ("What are the color and shape of the red
    circle?" -> "red circle"): a colour question is answered by copying the colour word, so the
    head it grows may read only the asked-for word, while an image question ("What color is the
    circle?") needs the other one; the whole phrase asked back needs a head that reads both."""
    if not kinds or any(k not in NAMED_KINDS for k in kinds):
        raise VituneError(f"named-object question kinds: want some of {', '.join(NAMED_KINDS)} (got {list(kinds)})")
    out = []
    for _ in range(count):
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        size = f"{rng.choice(SIZES)} " if rng.random() < 0.3 else ""
        qtype = rng.choice(tuple(kinds))
        subject = f"the {size}{color} {shape}"
        if qtype == "object":
            out.append(Question("object", rng.choice(_OBJECT_TEMPLATES).format(x=subject), f"{color} {shape}", _OBJECT_CHOICES, subject=subject))
            continue
        question = rng.choice(_TEMPLATES[qtype]).format(x=subject)
        answer = color if qtype == "color" else shape
        out.append(Question(qtype, question, answer, COLORS if qtype == "color" else SHAPES, subject=subject))
    return out
