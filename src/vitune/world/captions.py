"""Captions of a synthetic scene: five true sentences in different styles, and their hard negatives.

Each caption family looks at the scene from one angle (inventory, where things are, how they
relate, how many of each, their order or sizes), so the five captions of a scene are varied and
together mention colour, shape, size, count, position and relations. Every claim is read off the
instances with `scene.position_phrase` / `scene.relation`, the same words the questions and the
evaluation use.

`hard_negative` rewrites one caption for a perturbed copy of the scene (one object's shape,
colour or position changed), with the same random choices, so the negative differs from the true
caption only in that detail (NegCLIP): a contrastive model can only tell them apart by looking at
that object's shape, colour or place.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

from vitune.world.scene import (
    COLORS,
    SHAPES,
    Instance,
    horizontal_position,
    position_phrase,
    relation,
    vertical_position,
)

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
PLURALS: dict[str, str] = {"cross": "crosses"}
# Relation words as captions say them; keys are `scene.relation`'s values.
RELATION_WORDS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# 3x3 grid cells: their centres in [0, 1], for moving an object to another place.
_CELL_CENTRES: tuple[float, ...] = (1 / 6, 1 / 2, 5 / 6)

Family = Callable[[Sequence[Instance], random.Random], str]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(word: str) -> str:
    return PLURALS.get(word, word + "s")


def counted(n: int, noun: str) -> str:
    """'one circle', 'three squares'."""
    return f"{number_word(n)} {noun if n == 1 else plural(noun)}"


def where(inst: Instance) -> str:
    """'in the center', 'at the top left', 'on the left', 'at the bottom'."""
    p = position_phrase(inst)
    if p == "center":
        return "in the center"
    if p in ("left", "right"):
        return f"on the {p}"
    return f"at the {p}"


def described(inst: Instance, rng: random.Random) -> str:
    """The object with or without its size word: 'large red circle' or 'red circle'."""
    if inst.size and rng.random() < 0.6:
        return f"{inst.size} {inst.name}"
    return inst.name


def article(inst: Instance, instances: Sequence[Instance], phrase: str) -> str:
    """'the red circle' when no other object has that colour and shape, else 'a red circle'."""
    same = sum(1 for o in instances if o.name == inst.name)
    if same == 1:
        return f"the {phrase}"
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def indefinite(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def inventory(instances: Sequence[Instance], rng: random.Random) -> str:
    """How many objects there are and what each one is."""
    n = len(instances)
    things = join([indefinite(described(o, rng)) for o in instances])
    if n == 1:
        lead = rng.choice(["There is one object", "The image shows a single object", "One object"])
        return f"{lead}: {things}."
    lead = rng.choice([
        f"There are {number_word(n)} objects",
        f"The image shows {number_word(n)} shapes",
        f"{capitalize(number_word(n))} objects",
    ])
    return f"{lead}: {things}."


def placements(instances: Sequence[Instance], rng: random.Random) -> str:
    """Where each object is in the image."""
    parts = [f"{indefinite(described(o, rng))} {where(o)}" for o in instances]
    lead = rng.choice(["", "In this picture, ", "We can see "])
    return capitalize(lead + join(parts)) + "."


def relations(instances: Sequence[Instance], rng: random.Random) -> str:
    """How the objects lie relative to each other (or where the only object is)."""
    if len(instances) == 1:
        only = instances[0]
        return capitalize(f"{indefinite(described(only, rng))} is alone {where(only)} of the image.")
    pairs = [
        (a, b, rel)
        for i, a in enumerate(instances)
        for j, b in enumerate(instances)
        if i < j and (rel := relation(a, b)) is not None
    ]
    if not pairs:
        return f"The {counted(len(instances), 'object')} are close together."
    rng.shuffle(pairs)
    sentences = []
    for a, b, rel in pairs[: min(len(pairs), rng.choice([1, 2]))]:
        sentences.append(capitalize(
            f"{article(a, instances, a.name)} is {RELATION_WORDS[rel]} {article(b, instances, b.name)}."
        ))
    return " ".join(sentences)


def tallies(instances: Sequence[Instance], rng: random.Random) -> str:
    """How many objects of each shape, or of each colour."""
    if rng.random() < 0.5:
        counts = Counter(o.category for o in instances)
        parts = [counted(counts[s], s) for s in sorted(counts, key=_rank(SHAPES))]
    else:
        counts = Counter(o.color for o in instances)
        parts = [
            f"{number_word(counts[c])} {c} {'object' if counts[c] == 1 else 'objects'}"
            for c in sorted(counts, key=_rank(COLORS))
        ]
    lead = rng.choice(["The image contains ", "There are ", "In total: "])
    if lead == "There are " and parts[0].startswith("one "):
        lead = "There is "
    return f"{lead}{join(parts)}."


def _rank(order: Sequence[str]) -> Callable[[str], tuple[int, str]]:
    """Sort key: the canonical order of SHAPES / COLORS, unknown names last."""
    return lambda name: (order.index(name) if name in order else len(order), name)


def in_order(instances: Sequence[Instance], rng: random.Random) -> str:
    """The objects from left to right (or top to bottom), when each has its own column (row);
    otherwise grouped by size. Never orders two objects whose order a viewer could dispute."""
    if len(instances) == 1:
        return capitalize(f"just {indefinite(described(instances[0], rng))}, {where(instances[0])}.")
    for axis, words, lines in ((0, "left to right", horizontal_position), (1, "top to bottom", vertical_position)):
        if len({lines(o) for o in instances}) == len(instances):
            ordered = sorted(instances, key=lambda o: o.center[axis])
            return f"From {words}: {join([indefinite(described(o, rng)) for o in ordered])}."
    groups = []
    for size in ("large", "small"):
        members = [o for o in instances if o.size == size]
        if members:
            groups.append(f"{capitalize(size)} shapes: {join([indefinite(o.name) for o in members])}.")
    return " ".join(groups)


FAMILIES: tuple[Family, ...] = (inventory, placements, relations, tallies, in_order)
# The family whose caption names every object with its colour, shape and place: it tells one
# scene from another, so retrieval is scored on it.
FULL_DESCRIPTION = FAMILIES.index(placements)
# Relation words and their opposites, for relation negatives.
_OPPOSITES: dict[str, str] = {
    " to the left of ": " to the right of ",
    " to the right of ": " to the left of ",
    " above ": " below ",
    " below ": " above ",
}


def caption(instances: Sequence[Instance], family: int, seed: int) -> str:
    """Caption of one family; the seed fixes its random choices (wording, which pairs)."""
    return FAMILIES[family](instances, random.Random(seed))


def captions_for(instances: Sequence[Instance], rng: random.Random) -> list[str]:
    """One caption per family (five), each true of the scene."""
    return [caption(instances, family, rng.getrandbits(32)) for family in range(len(FAMILIES))]


def _moved(inst: Instance, rng: random.Random) -> Instance:
    """The same object with its centre moved to another 3x3 cell (box kept the same size)."""
    x1, y1, x2, y2 = inst.bbox
    cx, cy = inst.center
    here = (min(int(cx * 3), 2), min(int(cy * 3), 2))
    cells = [(i, j) for i in range(3) for j in range(3) if (i, j) != here]
    i, j = rng.choice(cells)
    nx, ny = _CELL_CENTRES[i], _CELL_CENTRES[j]
    return Instance(inst.category, (x1 - cx + nx, y1 - cy + ny, x2 - cx + nx, y2 - cy + ny), inst.color, inst.size)


def perturb(instances: Sequence[Instance], kind: str, rng: random.Random) -> list[Instance]:
    """A copy of the scene with one object's shape, colour or position changed."""
    out = list(instances)
    k = rng.randrange(len(out))
    o = out[k]
    if kind == "shape":
        out[k] = Instance(rng.choice([s for s in SHAPES if s != o.category]), o.bbox, o.color, o.size)
    elif kind == "color":
        out[k] = Instance(o.category, o.bbox, rng.choice([c for c in COLORS if c != o.color]), o.size)
    elif kind == "position":
        out[k] = _moved(o, rng)
    else:
        raise ValueError(f"unknown perturbation {kind!r} (known: shape, color, position)")
    return out


NEGATIVE_KINDS: tuple[str, ...] = ("shape", "color", "position")


def hard_negative(
    instances: Sequence[Instance], family: int, seed: int, kind: str, rng: random.Random
) -> str | None:
    """A false caption that differs from `caption(instances, family, seed)` in one detail.

    Object-listing families are rewritten, with the same random choices, for a copy of the scene
    where one object's shape, colour or place changed; since they list every object, the result
    claims an object the scene does not have. The relation family (which names only some pairs)
    instead flips one relation word ('left of' <-> 'right of', 'above' <-> 'below'). Returns None
    when no tried change alters the words (a colour tally cannot see a shape swap), so a negative
    is never a true caption."""
    true = caption(instances, family, seed)
    if FAMILIES[family] is relations:
        # Only flip a sentence about two unique objects ('The red circle ... the blue star'):
        # with 'a red circle' another red circle could make the flipped sentence true.
        sentences = [s + "." for s in true.split(".") if s.strip()]
        flippable = [
            (k, word)
            for k, sentence in enumerate(sentences)
            for word in _OPPOSITES
            if sentence.lstrip().startswith("The ") and f"{word}the " in sentence
        ]
        if not flippable:
            return None
        k, word = rng.choice(flippable)
        sentences[k] = sentences[k].replace(word, _OPPOSITES[word], 1)
        return "".join(sentences)
    if FAMILIES[family] is in_order and kind == "position":
        return None  # a moved object can reorder the list into another true order
    for _ in range(4):
        fake = caption(perturb(instances, kind, rng), family, seed)
        if fake != true:
            return fake
    return None
