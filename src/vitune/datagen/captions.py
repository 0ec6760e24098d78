"""Stage-1 (feature alignment) data: image-caption pairs -> one-turn "describe briefly" samples.

Each pair becomes `[{"from": "human", "value": "<image>\\n" + INSTRUCTION}, {"from": "gpt", "value": CAPTION}]`
with the instruction drawn from the versioned list of brief-description phrasings
(`prompts/brief/vN/instructions.txt`, eleven of them, as in the paper's Table 8).

Inputs: JSONL (`{"image", "caption"}` or `{"image", "captions": [...]}`, e.g. the annotations
format), CSV with `image` and `caption` columns, or a COCO captions file.

The concept-coverage filter (LLaVA's CC3M -> 595K): noun phrases are extracted from every
caption and counted over the corpus (in how many captions each appears); phrases seen fewer than
`min_count` times are skipped; then, from the rarest phrase to the most frequent, the captions
containing each phrase join the pool, at most `max_per_phrase` of them (a random subset) per
phrase. Captions whose phrases are all rare are dropped; frequent concepts are capped.

Noun phrases come from TextBlob's pattern parser (the `textblob` package on PyPI): a
rule/lexicon-based tagger and chunker whose lexicon ships inside the package, so it works offline
with nothing downloaded at run time (spaCy's noun chunks and NLTK's taggers need model or data
downloads that are not on PyPI). Determiners, numbers and pronouns are stripped from the phrase
and its head noun is singularised, so "two dogs" and "the dog" count as one concept.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitune.datagen.context import load_json
from vitune.datagen.teachers import load_prompt
from vitune.errors import VituneError

_DROP_TAGS = {"DT", "CD", "PRP", "PRP$", "WDT", "WP", "WP$", "PDT", "EX", "POS", "CC"}
_NOUN_TAGS = {"NN", "NNS", "NNP", "NNPS"}


@dataclass(frozen=True)
class CaptionPair:
    id: str
    image: str
    caption: str


def read_pairs(path: str | Path, image_column: str = "image", caption_column: str = "caption",
               all_captions: bool = False, seed: int = 0) -> list[CaptionPair]:
    """Image-caption pairs from JSONL or CSV (by suffix). A record with several captions gives one
    pair (drawn with the seed), or all of them with `all_captions`."""
    path = Path(path)
    if not path.exists():
        raise VituneError(f"captions file not found: {path}")
    rng = random.Random(seed)
    pairs: list[CaptionPair] = []
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {image_column, caption_column} - set(reader.fieldnames or [])
            if missing:
                raise VituneError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
            for lineno, row in enumerate(reader, 2):
                caption = " ".join((row[caption_column] or "").split())
                if not caption:
                    raise VituneError(f"{path}:{lineno}: empty {caption_column!r}")
                pairs.append(CaptionPair(str(row.get("id") or lineno - 1), row[image_column], caption))
        return pairs
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise VituneError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(rec, dict) or image_column not in rec:
                raise VituneError(f"{where}: missing field {image_column!r}")
            if caption_column in rec:
                captions = [rec[caption_column]]
            elif isinstance(rec.get("captions"), list) and rec["captions"]:
                captions = rec["captions"] if all_captions else [rng.choice(rec["captions"])]
            else:
                raise VituneError(f"{where}: missing field {caption_column!r} (or a non-empty 'captions' list)")
            rid = str(rec.get("id", lineno))
            for i, cap in enumerate(captions):
                cap = " ".join(str(cap).split())
                if not cap:
                    raise VituneError(f"{where}: empty caption")
                pairs.append(CaptionPair(rid if len(captions) == 1 else f"{rid}-{i}", str(rec[image_column]), cap))
    return pairs


def coco_pairs(path: str | Path, image_prefix: str = "", all_captions: bool = False, seed: int = 0) -> list[CaptionPair]:
    data = load_json(path, "COCO captions")
    from vitune.datagen.context import coco_to_annotations

    rng = random.Random(seed)
    pairs = []
    for rec in coco_to_annotations(data, None, image_prefix, captions_path=str(path)):
        caps = rec["captions"] if all_captions else [rng.choice(rec["captions"])]
        for i, cap in enumerate(caps):
            pairs.append(CaptionPair(rec["id"] if len(caps) == 1 else f"{rec['id']}-{i}", rec["image"], cap))
    return pairs


# -- noun phrases and the concept-coverage filter ------------------------------------------------


def noun_phrases(text: str) -> set[str]:
    """Normalised noun phrases of a caption ('A man riding two brown horses' -> {'man', 'brown horse'})."""
    from textblob import Word
    from textblob.en import parse

    tagged = parse(text, tokenize=True, tags=True, chunks=True, relations=False, lemmata=False)
    phrases: set[str] = set()
    current: list[tuple[str, str]] = []

    def flush() -> None:
        words = [(w, t) for w, t in current if t not in _DROP_TAGS and (w.isalpha() or "-" in w)]
        while words and words[-1][1] not in _NOUN_TAGS:
            words.pop()  # a chunk that ends without a noun ("the red") is not a concept
        if words:
            head = words[-1][0].lower()
            if words[-1][1] in ("NNS", "NNPS"):
                head = str(Word(head).singularize())
            phrases.add(" ".join([w.lower() for w, _ in words[:-1]] + [head]))
        current.clear()

    for sentence in tagged.split("\n"):
        for token in sentence.split(" "):
            parts = token.split("/")
            if len(parts) < 3:
                continue
            word, tag, chunk = parts[0].replace("&slash;", "/"), parts[1], parts[2]
            if chunk == "B-NP" or (chunk != "I-NP" and current):
                flush()
            if chunk in ("B-NP", "I-NP"):
                current.append((word, tag))
        flush()
    return phrases


@dataclass
class FilterReport:
    captions: int
    kept: int
    phrases: int
    rare_phrases: int
    capped_phrases: int


def concept_filter(captions: Sequence[str], min_count: int = 3, max_per_phrase: int = 100,
                   seed: int = 0) -> tuple[list[int], FilterReport]:
    """Indices of the captions kept by LLaVA's concept-coverage filter (in input order)."""
    rng = random.Random(seed)
    by_phrase: dict[str, list[int]] = defaultdict(list)
    for i, cap in enumerate(captions):
        for phrase in noun_phrases(cap):
            by_phrase[phrase].append(i)
    freq = Counter({p: len(ix) for p, ix in by_phrase.items()})
    kept: set[int] = set()
    rare = capped = 0
    for phrase, n in sorted(freq.items(), key=lambda kv: (kv[1], kv[0])):
        if n < min_count:
            rare += 1
            continue
        members = by_phrase[phrase]
        if n > max_per_phrase:
            capped += 1
            members = rng.sample(members, max_per_phrase)
        kept.update(members)
    order = sorted(kept)
    return order, FilterReport(len(captions), len(order), len(freq), rare, capped)


# -- samples -------------------------------------------------------------------------------------


def caption_samples(pairs: Iterable[CaptionPair], seed: int = 0, prompt_version: str | None = None,
                    image_position: str = "first") -> list[dict]:
    """One-turn LLaVA samples: a random brief instruction with the image, the caption as answer."""
    if image_position not in ("first", "last", "random"):
        raise VituneError(f"image position must be first, last or random, got {image_position!r}")
    prompt = load_prompt("brief", prompt_version)
    if len(prompt.instructions) < 10:
        raise VituneError(f"prompts/brief/{prompt.version}/instructions.txt: need >= 10 phrasings, found {len(prompt.instructions)}")
    rng = random.Random(seed)
    out = []
    for pair in pairs:
        instruction = rng.choice(prompt.instructions)
        last = image_position == "last" or (image_position == "random" and rng.random() < 0.5)
        human = f"{instruction}\n<image>" if last else f"<image>\n{instruction}"
        out.append({
            "id": pair.id,
            "image": pair.image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": pair.caption}],
            "kind": "brief",
            "source_id": pair.id,
            "prompt_version": prompt.tag,
        })
    return out
