"""The offline rules judge for `toy-bench`: scores answers by their factual agreement with the scene.

It reads the checkable claims out of an answer (which coloured shapes exist or do not, how many
there are, where one is, how two relate), checks each against the scene's annotation, and
compares them with the facts the reference answer states:

    precision = true claims / claims made          (no claims: 1 if the reference states none, else 0)
    coverage  = reference facts restated / reference facts
    score     = 1 + 9 * precision * coverage       (1..10, like an LLM judge's)

The review text has the same shape as an LLM judge's ("10 6.4" on the first line, then the
reasons), so reviews from either judge are parsed and scored by the same code. Sentences about a
hypothetical ("if one circle were removed, there would be ...") are not checked, nor are claims the
scene cannot decide (two objects too close to say which is left).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vitune.eval.llava_bench import JudgeInput
from vitune.world.scene import (
    COLORS,
    SHAPES,
    Instance,
    Scene,
    horizontal_position,
    relation,
    vertical_position,
)

NUMBER_WORDS: dict[str, int] = {
    "no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "single": 1,
}  # fmt: skip
SIZE_WORDS: dict[str, str] = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_SHAPE_ALT = "|".join(SHAPES)
_COLOR_ALT = "|".join(COLORS)
_GENERIC = "objects?|shapes?|items?|things?"
_NUM_ALT = "|".join(sorted((w for w in NUMBER_WORDS if w != "no"), key=len, reverse=True))
_MENTION = re.compile(
    rf"\b(?:(?P<num>\d+|{_NUM_ALT}|no)\s+)?(?:(?P<size>{'|'.join(SIZE_WORDS)})\s+)?"
    rf"(?:(?P<color>{_COLOR_ALT})\s+)?(?:(?P<size2>{'|'.join(SIZE_WORDS)})\s+)?"
    rf"(?P<noun>(?:{_SHAPE_ALT})(?:e?s)?|{_GENERIC})\b"
)
# "the circle is red", "the circles are all blue"
_PREDICATE_COLOR = re.compile(rf"\b(?P<shape>{_SHAPE_ALT})(?:e?s)?\s+(?:is|are)\s+(?:all\s+)?(?P<color>{_COLOR_ALT})\b")
# A clause negated other than by "no <noun>" is not checked: what it denies is ambiguous.
_NEGATION = re.compile(r"\b(?:not|none|without|neither|nor|never)\b|n't\b")
_HYPOTHETICAL = re.compile(
    r"\b(?:if|would|could|might|were|imagine|suppose|after|removed?|removing|added?|adding|moved?|instead|"
    r"tak(?:e|es|ing)|leaves?|leaving|remains?|remaining|gives?|flipped|mirrored|repaint\w*|than)\b"
)
# Instructions ("First, count the circles") state nothing.
_IMPERATIVE = re.compile(
    r"^(?:(?:first|then|next|now|so|finally)\s*,?\s+)?(?:count|look|find|compare|consider|check|let's|let us|note)\b"
)
_COLOR_WORD = re.compile(rf"\b({_COLOR_ALT})\b")
_COLOR_LIST = re.compile(r"\bcolou?rs?\b")
# "in the top left of the image" is a position, not a relation: only "to the left of" / "is left of".
_RELATIONS = (
    (re.compile(r"\bto the left of\b|(?<!the )(?<!top )(?<!bottom )(?<!upper )(?<!lower )\bleft of\b"), "left of"),
    (re.compile(r"\bto the right of\b|(?<!the )(?<!top )(?<!bottom )(?<!upper )(?<!lower )\bright of\b"), "right of"),
    (re.compile(r"\b(?:above|over|on top of)\b"), "above"),
    (re.compile(r"\b(?:below|under|beneath|underneath)\b"), "below"),
)
_POSITION = re.compile(
    r"\b(?:in|at|on|near|toward|towards)\s+the\s+"
    r"(?P<phrase>(?:(?:top|upper|bottom|lower|middle|center|centre)[\s-]+)?(?:left|right|top|bottom|upper|lower|middle|center|centre))\b"
)
_YES_NO_QUESTION = re.compile(r"^\s*(?:is|are|does|do|can|could|was|were|has|have)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Mention:
    color: str | None
    shape: str | None  # None: any object ("red objects", "shapes")
    size: str | None
    count: int | None  # a stated number, if any
    plural: bool


@dataclass(frozen=True)
class Claim:
    kind: str  # "exists" | "absent" | "count" | "position" | "relation"
    subject: tuple[str | None, str | None]  # (color, shape)
    value: object = None  # count n, position (h, v), relation (phrase, (color, shape))


def _mentions(sentence: str) -> list[tuple[Mention, int, int]]:
    out = []
    for m in _MENTION.finditer(sentence):
        noun = m.group("noun")
        shape = next((s for s in SHAPES if noun.startswith(s)), None)
        plural = noun.endswith("s") and noun not in SHAPES
        if shape is None and not m.group("color") and not m.group("num"):
            continue  # a bare "objects" says nothing checkable
        num = m.group("num")
        count = (int(num) if num.isdigit() else NUMBER_WORDS[num]) if num else None
        size_word = m.group("size") or m.group("size2")
        out.append((Mention(m.group("color"), shape, SIZE_WORDS[size_word] if size_word else None, count, plural), m.start(), m.end()))
    return out


def _position_of(phrase: str) -> tuple[str | None, str | None]:
    words = re.split(r"[\s-]+", phrase.replace("upper", "top").replace("lower", "bottom").replace("centre", "center"))
    h = next((w for w in words if w in ("left", "right")), None)
    v = next((w for w in words if w in ("top", "bottom")), None)
    if h is None and v is None:  # "in the middle", "at the center"
        return "center", "middle"
    return h, v


def extract_claims(text: str) -> list[Claim]:
    """The checkable claims of a text, sentence by sentence."""
    claims: list[Claim] = []
    for sentence in re.split(r"(?<=[.!?;])\s+|\n+|:\s+(?=there|it|they|this)|,\s+(?:and|but|so|while|whereas)\s+", text.lower()):
        sentence = sentence.strip()
        if not sentence or _HYPOTHETICAL.search(sentence) or _IMPERATIVE.match(sentence) or _NEGATION.search(sentence):
            continue
        mentions = _mentions(sentence)
        for m in _PREDICATE_COLOR.finditer(sentence):
            claims.append(Claim("exists", (m.group("color"), m.group("shape"))))
        if _COLOR_LIST.search(sentence):  # "the colors are red, blue and green"
            mentioned = {(mn.color, mn.shape) for mn, _, _ in mentions}
            claims += [Claim("exists", (c, None)) for c in _COLOR_WORD.findall(sentence) if (c, None) not in mentioned]
        for mention, _, _ in mentions:
            subject = (mention.color, mention.shape)
            if mention.count == 0:
                claims.append(Claim("absent", subject))
            elif mention.count is not None and (mention.plural or mention.count == 1):
                claims.append(Claim("count", subject, mention.count))
            elif mention.shape is not None or mention.color is not None:
                claims.append(Claim("exists", subject))
        shaped = [(mn, s, e) for mn, s, e in mentions if mn.shape is not None or mn.color is not None]
        rel = next(((name, pat) for pat, name in _RELATIONS if pat.search(sentence)), None)
        if rel is not None and len(shaped) == 2:
            (a, _, a_end), (b, b_start, _) = shaped
            between = sentence[a_end:b_start]
            if rel[1].search(between):
                claims.append(Claim("relation", (a.color, a.shape), (rel[0], (b.color, b.shape))))
            continue
        pos = _POSITION.search(sentence)
        if pos is not None and len(shaped) == 1 and rel is None:
            claims.append(Claim("position", (shaped[0][0].color, shaped[0][0].shape), _position_of(pos.group("phrase"))))
    return claims


_PRONOUN = re.compile(r"^\s*(it|they|its|their)\b", re.IGNORECASE)


def resolve_pronoun(question: str, answer: str) -> str:
    """'It is blue.' after 'What color is the cross?' -> 'The cross is blue.': a short answer
    that opens with a pronoun refers to the question's one object."""
    m = _PRONOUN.match(answer)
    found = _mentions(question.lower())
    if m is None or len(found) != 1:
        return answer
    _, start, end = found[0]
    phrase = question.lower()[start:end]
    if m.group(1).lower() in ("its", "their"):
        phrase += "'s"
    return f"the {phrase}{answer[m.end():]}"


def answer_claims(question: str, answer: str) -> list[Claim]:
    """The claims of an answer to `question`, pronouns resolved and a bare yes/no expanded."""
    return extract_claims(resolve_pronoun(question, answer)) + yes_no_claims(question, answer)


def yes_no_claims(question: str, answer: str) -> list[Claim]:
    """A bare "yes"/"no" to a yes/no question asserts (or denies) the question's one claim."""
    reply = answer.strip().lower()
    if not _YES_NO_QUESTION.match(question) or not re.match(r"^(yes|no)\b", reply):
        return []
    asked = [c for c in extract_claims(question.rstrip("?") + ".") if c.kind in ("exists", "relation", "position")]
    if len(asked) != 1:
        return []
    claim = asked[0]
    if reply.startswith("yes"):
        return [claim]
    return [Claim("absent", claim.subject)] if claim.kind == "exists" else []


def _matches(scene: Scene, subject: tuple[str | None, str | None]) -> list[Instance]:
    color, shape = subject
    return [i for i in scene.instances if (color is None or i.color == color) and (shape is None or i.category == shape)]


def check_claim(scene: Scene, claim: Claim) -> bool | None:
    """True/False against the scene, or None when the scene cannot decide it."""
    found = _matches(scene, claim.subject)
    if claim.kind == "exists":
        return bool(found)
    if claim.kind == "absent":
        return not found
    if claim.kind == "count":
        return len(found) == claim.value
    if claim.kind == "position":
        h, v = claim.value  # type: ignore[misc]
        return any((h is None or horizontal_position(i) == h) and (v is None or vertical_position(i) == v) for i in found)
    if claim.kind == "relation":
        phrase, other = claim.value  # type: ignore[misc]
        rels = [relation(a, b) for a in found for b in _matches(scene, other) if a is not b]
        decided = [r for r in rels if r is not None]
        if not decided:
            return None if rels else False
        return phrase in decided
    raise ValueError(f"unknown claim kind {claim.kind!r}")


def _implied(claims: Sequence[Claim]) -> set[Claim]:
    """Claims plus the existence each positive claim implies (for matching reference facts)."""
    out = set(claims)
    for c in claims:
        if c.kind in ("count", "position", "relation") and (c.kind != "count" or (c.value or 0) > 0):
            out.add(Claim("exists", c.subject))
    return out


@dataclass(frozen=True)
class Verdict:
    score: float
    claims: int
    true: int
    covered: int
    facts: int


def judge_answer(scene: Scene, question: str, answer: str, facts: Sequence[Claim]) -> Verdict:
    claims = answer_claims(question, answer)
    checked = [(c, check_claim(scene, c)) for c in dict.fromkeys(claims)]
    decided = [(c, ok) for c, ok in checked if ok is not None]
    true = sum(1 for _, ok in decided if ok)
    if decided:
        precision = true / len(decided)
    else:
        precision = 0.0 if facts else 1.0
    said = _implied([c for c, ok in decided if ok])
    covered = sum(1 for f in facts if f in said)
    coverage = covered / len(facts) if facts else 1.0
    return Verdict(round(1 + 9 * precision * coverage, 1), len(decided), true, covered, len(facts))


def reference_facts(scene: Scene, question: str, reference: str) -> list[Claim]:
    claims = answer_claims(question, reference)
    return [c for c in dict.fromkeys(claims) if check_claim(scene, c)]


def review_text(ref: Verdict, model: Verdict) -> str:
    return (
        f"{ref.score:g} {model.score:g}\n"
        f"Rules judge: Assistant 1 makes {ref.claims} checkable claim(s), {ref.true} true. "
        f"Assistant 2 makes {model.claims} checkable claim(s), {model.true} true, "
        f"and restates {model.covered} of the reference's {model.facts} fact(s)."
    )


class RulesJudge:
    """Judge protocol over `JudgeInput`s whose `extra["scene"]` is the question's `Scene`."""

    name = "rules"

    def review(self, items: Sequence[JudgeInput], run: int) -> list[tuple[str | None, str | None]]:
        out: list[tuple[str | None, str | None]] = []
        for item in items:
            scene = item.extra.get("scene")
            if not isinstance(scene, Scene):
                out.append((None, "rules judge: no scene for this question"))
                continue
            facts = reference_facts(scene, item.question, item.reference)
            ref = judge_answer(scene, item.question, item.reference, facts)
            model = judge_answer(scene, item.question, item.answer, facts)
            out.append((review_text(ref, model), None))
        return out
