"""The offline rules teacher: all three kinds of instruction data from a synthetic-world annotation.

Deterministic given a seed, fast (thousands of scenes a second) and correct by construction: every
sentence is written from the instances, with the same position/relation words as the captions and
the evaluation (`vitune.world.scene`), and every answer carries `Fact`s, the machine-checkable
claims it makes, so tests can verify each answer against the annotation independently.

- `conversation`: 3-6 turns mixing the shared short-answer questions (`vitune.world.questions`;
  some with LLaVA-1.5's "Answer with a single word or phrase." suffix and a bare answer, the rest
  answered in a full sentence) with open questions (what is there, how many in total, which
  colours, which object is highest/leftmost).
- `detail`: a paragraph: inventory, where each object is, one or two relations, a summary of the
  counts and colours.
- `complex`: one question that needs a few steps, answered step by step: counting after removing
  or adding objects, comparing counts, comparing positions, the nearest object, where an object
  goes when the image is flipped, the fewest objects to repaint to make all colours the same.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from vitune.datagen.parse import Turn
from vitune.world.questions import (
    Question,
    plural,
    referring,
    short_answer_questions,
)
from vitune.world.scene import COLORS, SHAPES, SIZES, Instance, Scene, position_phrase, relation

RULES_VERSION = "rules/v1"
KINDS: tuple[str, ...] = ("conversation", "detail", "complex")
SUFFIX_PROBABILITY = 0.4  # share of short-answer questions asked LLaVA-1.5 style with a bare answer
MARGIN = 0.1  # centre distance below which "higher", "further left" are not claimed (as `relation`)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")  # fmt: skip

Selector = dict  # {"category": "circle", "color": "red", "size": "small"}: instances matching all


@dataclass(frozen=True)
class Fact:
    """One claim an answer makes, checkable against the annotation.

    kinds and args:
      count(sel, n)                   exactly n instances match sel
      attr(sel, field, value)         the one instance matching sel has field == value
      position(sel, phrase)           the one instance matching sel is at position_phrase
      exists_at(sel, phrase)          some instance matching sel is at position_phrase
      relation(a, b, rel)             relation(a, b) == rel (a, b: selectors of one instance each)
      exists(sel, present)            some instance matches sel == present
      further(a, b, direction)        a's centre is beyond b's by >= MARGIN ("up", "down", "left", "right")
      extreme(sel, direction)         the one instance matching sel is the furthest in direction, by >= MARGIN
      nearest(a, b)                   b is the instance nearest to a (centres), clearly
      mirror_position(sel, axis, phrase)  position_phrase of the instance flipped along axis
      color_set(colors)               the set of colours present
      distinct(field)                 no two instances share the field's value
      majority(field, value)          value is the unique most common `field` value
      arithmetic(a, op, b, result)    a op b == result (op: "+", "-")
    """

    kind: str
    args: tuple

    @staticmethod
    def of(kind: str, *args: object) -> Fact:
        return Fact(kind, tuple(args))


@dataclass
class RulesSample:
    kind: str
    turns: list[Turn]  # human, gpt, human, gpt, ...
    facts: list[list[Fact]] = field(default_factory=list)  # per gpt turn
    # noun phrases an answer may mention without them being in the scene (negations, hypotheticals)
    hypothetical: list[list[str]] = field(default_factory=list)


# -- words ---------------------------------------------------------------------------------------


def number(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def noun(sel: Selector, n: int = 1) -> str:
    """'small red circle(s)', 'red object(s)', 'object(s)' for a selector."""
    words = [sel[k] for k in ("size", "color") if sel.get(k)]
    head = sel.get("category") or "object"
    phrase = " ".join(words + [head])
    return phrase if n == 1 else plural(phrase)


def counted(sel: Selector, n: int) -> str:
    """'three red circles', 'one star', 'no squares'."""
    if n == 0:
        return f"no {noun(sel, 2)}"
    return f"{number(n)} {noun(sel, n)}"


def join_words(items: list[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def where(phrase: str, rng: random.Random) -> str:
    """A position phrase in a sentence; always contains the phrase itself."""
    if phrase == "center":
        return rng.choice(("in the center of the image", "in the center", "right in the center of the picture"))
    if phrase in ("top", "bottom"):
        return rng.choice((f"at the {phrase} of the image", f"at the {phrase}", f"in the middle of the {phrase} edge"))
    if phrase in ("left", "right"):
        return rng.choice((f"on the {phrase} side of the image", f"on the {phrase}", f"in the middle of the {phrase} side"))
    return rng.choice((f"in the {phrase} corner", f"in the {phrase} of the image", f"in the {phrase} part of the picture"))


def relation_words(rel: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)


def matches(inst: Instance, sel: Selector) -> bool:
    return all(getattr(inst, k) == v for k, v in sel.items())


def select(scene: Scene, sel: Selector) -> list[Instance]:
    return [i for i in scene.instances if matches(i, sel)]


def selector_of_phrase(phrase: str, scene: Scene) -> Selector:
    """'the small red circle' / 'red circles' / 'blue objects' -> selector."""
    words = phrase.removeprefix("the ").split()
    sel: Selector = {}
    while words and (words[0] in SIZES or words[0] in COLORS):
        word = words.pop(0)
        sel["size" if word in SIZES else "color"] = word
    rest = " ".join(words)
    if rest in ("object", "objects", ""):
        return sel
    for cat in set(SHAPES) | {i.category for i in scene.instances}:
        if rest in (cat, plural(cat)):
            sel["category"] = cat
            return sel
    sel["category"] = rest
    return sel


def mirrored(inst: Instance, axis: str) -> Instance:
    x1, y1, x2, y2 = inst.bbox
    box = (1 - x2, y1, 1 - x1, y2) if axis == "horizontal" else (x1, 1 - y2, x2, 1 - y1)
    return Instance(inst.category, box, inst.color, inst.size)


@dataclass(frozen=True)
class Ref:
    inst: Instance
    phrase: str  # "the red circle"
    sel: Selector


def refs(scene: Scene) -> list[Ref]:
    out = []
    for inst in scene.instances:
        found = referring(scene, inst)
        if found:
            out.append(Ref(inst, found[0], found[1]))
    return out


def full_selector(inst: Instance) -> Selector:
    return {k: getattr(inst, k) for k in ("size", "color", "category") if getattr(inst, k)}


def a_noun(inst: Instance) -> str:
    phrase = noun(full_selector(inst))
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def inventory(scene: Scene) -> tuple[str, list[Fact]]:
    """'two red circles, a blue square and a green star' with a count fact per group."""
    groups = Counter((i.color, i.category) for i in scene.instances)
    parts, facts = [], []
    for (color, category), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0][1], kv[0][0])):
        sel = {k: v for k, v in (("color", color), ("category", category)) if v}
        phrase = noun(sel, n)
        if n == 1:
            parts.append(("an " if phrase[0] in "aeiou" else "a ") + phrase)
        else:
            parts.append(f"{number(n)} {phrase}")
        facts.append(Fact.of("count", sel, n))
    return join_words(parts), facts


def is_shapes(scene: Scene) -> bool:
    return all(i.category in SHAPES for i in scene.instances)


def thing(scene: Scene, n: int = 2) -> str:
    return ("shape" if n == 1 else "shapes") if is_shapes(scene) else ("object" if n == 1 else "objects")


# -- conversation --------------------------------------------------------------------------------


def _natural_answer(q: Question, scene: Scene, rng: random.Random) -> tuple[str, list[Fact], list[str]]:
    """A full-sentence answer to a shared short-answer question, its facts and hypothetical nouns."""
    subj = q.subject
    if q.type == "color":
        sel = selector_of_phrase(subj, scene)
        text = rng.choice((f"{cap(subj)} is {q.answer}.", f"It is {q.answer}.", f"The color of {subj} is {q.answer}.",
                           f"{cap(subj)} in the image is {q.answer}."))
        return text, [Fact.of("attr", sel, "color", q.answer)], []
    if q.type == "shape":
        sel = selector_of_phrase(subj, scene)
        art = "an" if q.answer[0] in "aeiou" else "a"
        text = rng.choice((f"{cap(subj)} is {art} {q.answer}.", f"It is {art} {q.answer}.",
                           f"{cap(subj)} has the shape of {art} {q.answer}."))
        return text, [Fact.of("attr", sel, "category", q.answer)], []
    if q.type == "count":
        sel = selector_of_phrase(subj, scene)
        n = int(q.answer)
        if n == 1:
            text = rng.choice((f"There is one {noun(sel)} in the image.", f"I can see just one {noun(sel)}.",
                               f"Only one: there is a single {noun(sel)}."))
        else:
            text = rng.choice((f"There are {counted(sel, n)} in the image.", f"I can see {counted(sel, n)}.",
                               f"The image contains {counted(sel, n)}."))
        return text, [Fact.of("count", sel, n)], []
    if q.type == "position":
        sel = selector_of_phrase(subj, scene)
        text = rng.choice((f"{cap(subj)} is {where(q.answer, rng)}.", f"It is {where(q.answer, rng)}.",
                           f"You can find {subj} {where(q.answer, rng)}."))
        return text, [Fact.of("position", sel, q.answer)], []
    if q.type == "existence":
        sel = selector_of_phrase(subj, scene)
        found = select(scene, sel)
        if q.answer == "yes":
            facts = [Fact.of("exists", sel, True)]
            if len(found) == 1:
                p = position_phrase(found[0])
                facts.append(Fact.of("exists_at", sel, p))
                art = "an" if noun(sel)[0] in "aeiou" else "a"
                text = rng.choice((f"Yes, there is {art} {noun(sel)} {where(p, rng)}.",
                                   f"Yes, {art} {noun(sel)} can be seen {where(p, rng)}."))
            else:
                facts.append(Fact.of("count", sel, len(found)))
                text = rng.choice((f"Yes, there are {counted(sel, len(found))} in the image.",
                                   f"Yes. In fact, I can see {counted(sel, len(found))}."))
            return text, facts, []
        facts = [Fact.of("exists", sel, False)]
        text = rng.choice((f"No, there is no {noun(sel)} in the image.", f"No, I don't see any {noun(sel, 2)}.",
                           f"No, the image has no {noun(sel, 2)}."))
        hypothetical = [noun(sel), noun(sel, 2)]
        # "Is there a red triangle?" with one blue triangle: say what is there instead
        if "color" in sel and "category" in sel:
            same_shape = select(scene, {"category": sel["category"]})
            if len(same_shape) == 1:
                other = same_shape[0]
                text += f" The only {sel['category']} in the image is {other.color}."
                facts.append(Fact.of("attr", {"category": sel["category"]}, "color", other.color))
        return text, facts, hypothetical
    if q.type == "relation":
        a, b = selector_of_phrase(subj, scene), selector_of_phrase(q.other, scene)
        words = relation_words(q.answer)
        text = rng.choice((f"{cap(subj)} is {words} {q.other}.", f"It is {words} {q.other}.",
                           f"Looking at the image, {subj} is {words} {q.other}."))
        return text, [Fact.of("relation", a, b, q.answer)], []
    raise ValueError(q.type)


def _open_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, list[Fact]]]:
    """Questions about the whole image: (question, answer, facts)."""
    out = []
    n = len(scene.instances)
    inv, inv_facts = inventory(scene)
    total = Fact.of("count", {}, n)
    q = rng.choice(("What do you see in this image?", f"What {thing(scene)} are in the image?",
                    "Can you tell me what is in this picture?", "What does the image show?"))
    if n == 1:
        a = rng.choice((f"The image shows a single {thing(scene, 1)}: {inv}.", f"There is just one {thing(scene, 1)}: {inv}."))
    else:
        a = rng.choice((f"I can see {number(n)} {thing(scene)}: {inv}.", f"The image shows {number(n)} {thing(scene)}: {inv}.",
                        f"There are {number(n)} {thing(scene)} in the image: {inv}."))
    out.append((q, a, [total, *inv_facts]))

    q = rng.choice((f"How many {thing(scene)} are there in total?", f"How many {thing(scene)} does the image contain?",
                    "What is the total number of objects in the picture?"))
    a = f"There is one {thing(scene, 1)} in total." if n == 1 else rng.choice(
        (f"There are {number(n)} {thing(scene)} in total.", f"The image contains {number(n)} {thing(scene)} altogether."))
    out.append((q, a, [total]))

    colors = sorted({i.color for i in scene.instances if i.color})
    if colors and all(i.color for i in scene.instances):
        q = rng.choice(("What colors appear in the image?", "Which colors can you see?", f"What colors are the {thing(scene)}?"))
        if len(colors) == 1:
            a = rng.choice((f"Everything in the image is {colors[0]}.", f"All the {thing(scene)} are {colors[0]}.")) if n > 1 \
                else f"There is only one color: {colors[0]}."
        else:
            a = rng.choice((f"The colors in the image are {join_words(colors)}.", f"I can see {join_words(colors)} {thing(scene)}."))
        out.append((q, a, [Fact.of("color_set", tuple(colors))]))

    for direction, question, adjective in (
        ("up", "Which object is the highest in the image?", "highest"),
        ("down", "Which object is closest to the bottom of the image?", "lowest"),
        ("left", "Which object is furthest to the left?", "leftmost"),
        ("right", "Which object is furthest to the right?", "rightmost"),
    ):
        best = _extreme(scene, direction)
        if best is not None:
            r = referring(scene, best)
            if r:
                p = position_phrase(best)
                a = rng.choice((f"{cap(r[0])} is the {adjective} object; it is {where(p, rng)}.",
                                f"The {adjective} one is {r[0]}, {where(p, rng)}."))
                out.append((question, a, [Fact.of("extreme", r[1], direction), Fact.of("position", r[1], p)]))
    return out


def _coordinate(inst: Instance, direction: str) -> float:
    x, y = inst.center
    return {"up": -y, "down": y, "left": -x, "right": x}[direction]


def _extreme(scene: Scene, direction: str) -> Instance | None:
    """The object furthest in `direction`, when it leads the next one by at least MARGIN."""
    if len(scene.instances) < 2:
        return None
    ranked = sorted(scene.instances, key=lambda i: -_coordinate(i, direction))
    if _coordinate(ranked[0], direction) - _coordinate(ranked[1], direction) < MARGIN:
        return None
    return ranked[0]


def conversation(scene: Scene, rng: random.Random) -> RulesSample:
    sample = RulesSample("conversation", [])
    short = short_answer_questions(scene, rng, per_type=1)
    rng.shuffle(short)
    short = short[: rng.randint(2, 4)]
    opened = _open_questions(scene, rng)
    inventory_question = opened[0][0]
    rng.shuffle(opened)
    opened = opened[: rng.randint(1, 2)]
    items: list[tuple[str, str, list[Fact], list[str]]] = []
    for q in short:
        if rng.random() < SUFFIX_PROBABILITY:
            facts, hyp = _short_answer_facts(q, scene)
            items.append((q.short_answer_prompt, q.answer, facts, hyp))
        else:
            text, facts, hyp = _natural_answer(q, scene, rng)
            items.append((q.question, text, facts, hyp))
    for q_text, a_text, facts in opened:
        items.append((q_text, a_text, facts, []))
    rng.shuffle(items)
    # "what do you see" reads best as the opening question, when it was drawn
    first = [i for i, it in enumerate(items) if it[0] == opened[0][0]]
    if opened and first and opened[0][0] == inventory_question and rng.random() < 0.7:
        items.insert(0, items.pop(first[0]))
    for q_text, a_text, facts, hyp in items:
        sample.turns += [Turn("human", q_text), Turn("gpt", a_text)]
        sample.facts.append(facts)
        sample.hypothetical.append(hyp)
    return sample


def _short_answer_facts(q: Question, scene: Scene) -> tuple[list[Fact], list[str]]:
    if q.type == "relation":
        return [Fact.of("relation", selector_of_phrase(q.subject, scene), selector_of_phrase(q.other, scene), q.answer)], []
    sel = selector_of_phrase(q.subject, scene)
    if q.type == "color":
        return [Fact.of("attr", sel, "color", q.answer)], []
    if q.type == "shape":
        return [Fact.of("attr", sel, "category", q.answer)], []
    if q.type == "count":
        return [Fact.of("count", sel, int(q.answer))], []
    if q.type == "position":
        return [Fact.of("position", sel, q.answer)], []
    hyp = [] if q.answer == "yes" else [noun(sel), noun(sel, 2)]
    return [Fact.of("exists", sel, q.answer == "yes")], hyp


# -- detail --------------------------------------------------------------------------------------


def _reading_order(scene: Scene) -> list[Instance]:
    return sorted(scene.instances, key=lambda i: (min(int(i.center[1] * 3), 2), i.center[0]))


def detail(scene: Scene, rng: random.Random, instruction: str) -> RulesSample:
    n = len(scene.instances)
    facts: list[Fact] = [Fact.of("count", {}, n)]
    sentences: list[str] = []
    if n == 0:
        sentences.append("The image is empty: there are no objects in it, only the background.")
        return RulesSample("detail", [Turn("human", instruction), Turn("gpt", sentences[0])], [facts], [[]])
    inv, inv_facts = inventory(scene)
    facts += inv_facts
    if n == 1:
        sentences.append(rng.choice((f"The image shows a single {thing(scene, 1)}: {inv}.",
                                     f"This is a simple picture with just one {thing(scene, 1)}, {inv}.")))
    else:
        sentences.append(rng.choice((f"The image shows {number(n)} {thing(scene)}: {inv}.",
                                     f"This picture contains {number(n)} {thing(scene)}, namely {inv}.",
                                     f"There are {number(n)} {thing(scene)} in this image: {inv}.")))
    for inst in _reading_order(scene):
        p = position_phrase(inst)
        sel = full_selector(inst)
        facts.append(Fact.of("exists_at", sel, p))
        sentences.append(rng.choice((
            f"{cap(where(p, rng))}, there is {a_noun(inst)}.",
            f"{cap(a_noun(inst))} sits {where(p, rng)}.",
            f"{cap(a_noun(inst))} can be seen {where(p, rng)}.",
            f"{cap(where(p, rng))} is {a_noun(inst)}.",
        )))
    pairs = [(a, b) for a in refs(scene) for b in refs(scene) if a.inst is not b.inst and relation(a.inst, b.inst)]
    rng.shuffle(pairs)
    used: set[frozenset] = set()
    for a, b in pairs:
        if len(used) >= 2:
            break
        if frozenset((id(a.inst), id(b.inst))) in used:
            continue
        used.add(frozenset((id(a.inst), id(b.inst))))
        rel = relation(a.inst, b.inst)
        assert rel is not None
        facts.append(Fact.of("relation", a.sel, b.sel, rel))
        sentences.append(rng.choice((f"{cap(a.phrase)} is {relation_words(rel)} {b.phrase}.",
                                     f"{cap(a.phrase)} lies {relation_words(rel)} {b.phrase}.")))
    colors = Counter(i.color for i in scene.instances if i.color)
    if n > 1 and len(colors) == n and all(i.color for i in scene.instances):
        sentences.append(f"Each {thing(scene, 1)} has a different color.")
        facts.append(Fact.of("distinct", "color"))
    elif n > 1 and colors:
        top = colors.most_common()
        if len(top) == 1 and top[0][1] == n:
            sentences.append(f"All of the {thing(scene)} are {top[0][0]}.")
            facts.append(Fact.of("color_set", (top[0][0],)))
        elif len(top) > 1 and top[0][1] > top[1][1]:
            sentences.append(f"{cap(top[0][0])} is the most common color, with {counted({'color': top[0][0]}, top[0][1])}.")
            facts += [Fact.of("majority", "color", top[0][0]), Fact.of("count", {"color": top[0][0]}, top[0][1])]
    sizes = Counter(i.size for i in scene.instances if i.size)
    if n > 1 and len(sizes) == 2:
        small, large = sizes["small"], sizes["large"]
        sentences.append(f"{cap(number(large))} of them {'is' if large == 1 else 'are'} large and "
                         f"{number(small)} {'is' if small == 1 else 'are'} small.")
        facts += [Fact.of("count", {"size": "large"}, large), Fact.of("count", {"size": "small"}, small)]
    body = " ".join(sentences)
    return RulesSample("detail", [Turn("human", instruction), Turn("gpt", body)], [facts], [[]])


# -- complex -------------------------------------------------------------------------------------

Reasoning = tuple[str, str, list[Fact], list[str]]  # question, answer, facts, hypothetical nouns


def _remove(scene: Scene, rng: random.Random) -> Reasoning | None:
    rs = refs(scene)
    if not rs:
        return None
    r = rng.choice(rs)
    n = len(scene.instances)
    if rng.random() < 0.5 or n == 1:
        q = rng.choice((f"If {r.phrase} were removed, how many {thing(scene)} would be left in the image?",
                        f"Suppose someone took away {r.phrase}. How many {thing(scene)} would remain?"))
        left = n - 1
        if n == 1:
            a = (f"{cap(r.phrase)} is the only {thing(scene, 1)} in the image, which has {number(n)} {thing(scene, 1)}. "
                 f"Removing it would leave no {thing(scene)} at all: the image would be empty.")
        else:
            a = (f"Right now there are {number(n)} {thing(scene, n)} in the image. "
                 f"Removing {r.phrase} takes away one of them, so {number(left)} {thing(scene, left)} would be left.")
        return q, a, [Fact.of("count", {}, n), Fact.of("attr", r.sel, "category", r.inst.category),
                      Fact.of("arithmetic", n, "-", 1, left)], []
    cat = r.inst.category
    same = len(select(scene, {"category": cat}))
    q = f"If {r.phrase} were removed, how many {plural(cat)} would remain?"
    left = same - 1
    if same == 1:
        a = (f"{cap(r.phrase)} is the only {cat} in the image, which has {counted({'category': cat}, same)}. "
             f"Taking it away leaves {counted({'category': cat}, left)}.")
    else:
        a = (f"There are currently {counted({'category': cat}, same)}, and {r.phrase} is one of them. "
             f"Taking it away leaves {counted({'category': cat}, left)}.")
    return q, a, [Fact.of("count", {"category": cat}, same), Fact.of("attr", r.sel, "category", cat),
                  Fact.of("arithmetic", same, "-", 1, left)], []


def _add(scene: Scene, rng: random.Random) -> Reasoning | None:
    cats = sorted({i.category for i in scene.instances} | (set(SHAPES) if is_shapes(scene) else set()))
    if not cats:
        return None
    cat = rng.choice(cats)
    k = rng.randint(1, 3)
    color = rng.choice(COLORS) if is_shapes(scene) else ""
    added = {"color": color, "category": cat} if color else {"category": cat}
    now = len(select(scene, {"category": cat}))
    q = f"If {counted(added, k) if k > 1 else ('an ' if noun(added)[0] in 'aeiou' else 'a ') + noun(added)} " \
        f"{'were' if k > 1 else 'was'} added to the image, how many {plural(cat)} would there be?"
    after = now + k
    a = (f"First, count the {plural(cat)} already in the image: there {'is' if now == 1 else 'are'} {counted({'category': cat}, now)}. "
         f"Adding {number(k)} more gives {now} + {k} = {after}, so there would be {counted({'category': cat}, after)}.")
    return q, a, [Fact.of("count", {"category": cat}, now), Fact.of("arithmetic", now, "+", k, after)], [noun(added), noun(added, 2)]


def _compare_counts(scene: Scene, rng: random.Random) -> Reasoning | None:
    by_cat = Counter(i.category for i in scene.instances)
    by_color = Counter(i.color for i in scene.instances if i.color)
    options: list[tuple[Selector, Selector]] = []
    cats = sorted(set(by_cat) | (set(SHAPES) if is_shapes(scene) else set()))
    options += [({"category": a}, {"category": b}) for a in cats for b in cats if a < b and (by_cat[a] or by_cat[b])]
    colors = sorted(by_color)
    options += [({"color": a}, {"color": b}) for a in colors for b in colors if a != b]
    if not options:
        return None
    sa, sb = rng.choice(options)
    if rng.random() < 0.5:
        sa, sb = sb, sa
    na, nb = len(select(scene, sa)), len(select(scene, sb))
    q = rng.choice((f"Are there more {noun(sa, 2)} than {noun(sb, 2)} in the image?",
                    f"Does the image contain more {noun(sa, 2)} than {noun(sb, 2)}?"))
    counts = f"Let's count. There {'is' if na == 1 else 'are'} {counted(sa, na)} and {counted(sb, nb)}."
    if na > nb:
        a = f"{counts} Since {number(na)} is more than {number(nb)}, yes, there are more {noun(sa, 2)} than {noun(sb, 2)}."
    elif na < nb:
        a = f"{counts} Since {number(na)} is less than {number(nb)}, no, there are fewer {noun(sa, 2)} than {noun(sb, 2)}."
    else:
        a = f"{counts} The numbers are equal, so no: there are as many {noun(sa, 2)} as {noun(sb, 2)}."
    hyp = [noun(s, k) for s in (sa, sb) for k in (1, 2) if not select(scene, s)]
    return q, a, [Fact.of("count", sa, na), Fact.of("count", sb, nb)], hyp


def _compare_positions(scene: Scene, rng: random.Random) -> Reasoning | None:
    rs = refs(scene)
    pairs = []
    for a in rs:
        for b in rs:
            if a.inst is b.inst:
                continue
            for direction in ("up", "left"):
                if _coordinate(a.inst, direction) - _coordinate(b.inst, direction) >= MARGIN:
                    pairs.append((a, b, direction))
    if not pairs:
        return None
    a, b, direction = rng.choice(pairs)
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    pa, pb = position_phrase(a.inst), position_phrase(b.inst)
    if direction == "up":
        q = f"Which is higher in the image, {first.phrase} or {second.phrase}?"
        verdict = f"{a.phrase} is higher" if rng.random() < 0.5 else f"{a.phrase} is higher up and {b.phrase} is lower"
    else:
        q = f"Which is further to the left, {first.phrase} or {second.phrase}?"
        verdict = f"{a.phrase} is further to the left" if rng.random() < 0.5 else f"{a.phrase} is further left and {b.phrase} further right"
    ans = f"{cap(a.phrase)} is {where(pa, rng)}, while {b.phrase} is {where(pb, rng)}. Comparing the two, {verdict}."
    facts = [Fact.of("position", a.sel, pa), Fact.of("position", b.sel, pb), Fact.of("further", a.sel, b.sel, direction)]
    return q, ans, facts, []


def _nearest(scene: Scene, rng: random.Random) -> Reasoning | None:
    rs = refs(scene)
    options = []
    for a in rs:
        others = sorted((math.dist(a.inst.center, o.inst.center), o) for o in rs if o.inst is not a.inst)
        if len(others) >= 2 and others[1][0] - others[0][0] >= MARGIN and len(rs) == len(scene.instances):
            options.append((a, others))
    if not options:
        return None
    a, others = rng.choice(options)
    b = others[0][1]
    q = rng.choice((f"Which object is closest to {a.phrase}?", f"What is the nearest object to {a.phrase}?"))
    pa, pb = position_phrase(a.inst), position_phrase(b.inst)
    far = others[-1][1]
    ans = (f"{cap(a.phrase)} is {where(pa, rng)}. Of the other objects, {b.phrase} is {where(pb, rng)}, much closer than "
           f"{far.phrase}, which is {where(position_phrase(far.inst), rng)}. So {b.phrase} is the closest to {a.phrase}.")
    facts = [Fact.of("position", a.sel, pa), Fact.of("position", b.sel, pb),
             Fact.of("position", far.sel, position_phrase(far.inst)), Fact.of("nearest", a.sel, b.sel)]
    return q, ans, facts, []


def _mirror(scene: Scene, rng: random.Random) -> Reasoning | None:
    rs = refs(scene)
    if not rs:
        return None
    r = rng.choice(rs)
    axis = rng.choice(("horizontal", "vertical"))
    before, after = position_phrase(r.inst), position_phrase(mirrored(r.inst, axis))
    if axis == "horizontal":
        q = f"If the image were flipped horizontally, like in a mirror, where would {r.phrase} be?"
        rule = "A horizontal flip swaps left and right but keeps top and bottom"
    else:
        q = f"If the image were flipped upside down, where would {r.phrase} end up?"
        rule = "Flipping the image upside down swaps top and bottom but keeps left and right"
    if before == after:
        tail = f"so {r.phrase} would stay {where(after, rng)}."
    else:
        tail = f"so {r.phrase} would end up {where(after, rng)}."
    ans = f"{cap(r.phrase)} is currently {where(before, rng)}. {rule}, {tail}"
    return q, ans, [Fact.of("position", r.sel, before), Fact.of("mirror_position", r.sel, axis, after)], []


def _repaint(scene: Scene, rng: random.Random) -> Reasoning | None:
    colors = Counter(i.color for i in scene.instances if i.color)
    n = len(scene.instances)
    if n < 2 or sum(colors.values()) != n:
        return None
    q = rng.choice((f"What is the smallest number of {thing(scene)} that would need to be repainted so that all of them have the same color?",
                    f"How many {thing(scene)} would have to change color for every {thing(scene, 1)} to be the same color?"))
    ranked = sorted(colors.items(), key=lambda kv: (-kv[1], kv[0]))
    listing = join_words([counted({"color": c}, k) for c, k in ranked])
    best = ranked[0][1]
    change = n - best
    facts = [Fact.of("count", {"color": c}, k) for c, k in ranked] + [Fact.of("count", {}, n),
                                                                       Fact.of("arithmetic", n, "-", best, change)]
    tied = [c for c, k in ranked if k == best]
    if len(tied) == 1:
        keep = f"The most common color is {tied[0]}, so the best plan is to keep the {tied[0]} ones and repaint the rest"
        facts.append(Fact.of("majority", "color", tied[0]))
    else:
        keep = f"{cap(join_words(tied))} are tied as the most common colors, so we keep either one and repaint the rest"
    if change == 0:
        every = "Both" if n == 2 else f"All {number(n)}"
        ans = f"{every} {thing(scene)} are already {ranked[0][0]}, so none need to be repainted: zero changes."
    else:
        ans = (f"First, count the colors: there {'is' if ranked[0][1] == 1 else 'are'} {listing}. {keep}: "
               f"{number(n)} {thing(scene)} minus {number(best)} kept leaves {number(change)} to repaint.")
    return q, ans, facts, []


REASONERS: dict[str, Callable[[Scene, random.Random], Reasoning | None]] = {
    "remove": _remove,
    "add": _add,
    "compare_counts": _compare_counts,
    "compare_positions": _compare_positions,
    "nearest": _nearest,
    "mirror": _mirror,
    "repaint": _repaint,
}


def complex_reasoning(scene: Scene, rng: random.Random) -> RulesSample:
    names = list(REASONERS)
    rng.shuffle(names)
    for name in names:
        made = REASONERS[name](scene, rng)
        if made is not None:
            q, a, facts, hyp = made
            return RulesSample("complex", [Turn("human", q), Turn("gpt", a)], [facts], [hyp])
    # an empty scene: the one question that still has a reasoned answer
    q = "If two objects were added to the image, how many objects would there be?"
    a = "The image is empty right now, with no objects. Adding two gives 0 + 2 = 2, so there would be two objects."
    return RulesSample("complex", [Turn("human", q), Turn("gpt", a)],
                       [[Fact.of("count", {}, 0), Fact.of("arithmetic", 0, "+", 2, 2)]], [[]])


def generate(scene: Scene, kind: str, rng: random.Random, detail_instructions: list[str] | None = None) -> RulesSample:
    """One sample of `kind` for `scene`."""
    if kind == "conversation":
        return conversation(scene, rng)
    if kind == "detail":
        instruction = rng.choice(detail_instructions or ["Describe the image in detail."])
        return detail(scene, rng, instruction)
    if kind == "complex":
        return complex_reasoning(scene, rng)
    raise ValueError(f"unknown kind {kind!r}")
