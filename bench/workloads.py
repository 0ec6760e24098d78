"""The inputs the cases run on: image prompts for decoding, and a synthetic stage-2 training set.

Everything is drawn from seeded generators, so two runs measure the same work. Images are noise
of varied sizes and colours (the processor pads and resizes them, as LLaVA-1.5 does); questions
differ in length. The training set mixes samples with one image and text-only samples, with
answer lengths from a long-tailed (log-normal) distribution and one to three turns, roughly the
shape of LLaVA-665K (short VQA answers, some long descriptions, some ShareGPT text-only talk).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.presets import ENGLISH, Preset, lexicon

QUESTIONS = (
    "Describe the image in detail.",
    "What is in the picture?",
    "What colour is the large object on the left, and what shape is the one next to it?",
    "How many objects are there?",
    "Where is the small circle, above or below the square? Explain your answer.",
    "What is this?",
    "Describe every object in this image: its colour, its shape, its size and where it is.",
    "Is there a triangle?",
)


def noise_image(seed: int, width: int, height: int):  # -> PIL.Image.Image
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype("uint8")
    return Image.fromarray(arr)


@dataclass
class Prompt:
    ids: list[int]
    pixels: Any  # Tensor [1, 3, H, W]


def image_prompts(pipe: Any, count: int, seed: int = 0) -> list[Prompt]:
    """`count` one-image prompts with different images and question lengths (the first one is
    the decode_b1 / prefill prompt)."""
    from vitune.inference import GenerationRequest

    rng = random.Random(seed)
    out = []
    for i in range(count):
        image = noise_image(seed * 1000 + i, rng.randint(120, 400), rng.randint(120, 400))
        request = GenerationRequest([{"role": "user", "content": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"}], [image])
        ids, pixels = pipe.prepare(request)
        out.append(Prompt(ids, pixels))
    return out


def _text(rng: random.Random, words: list[str], n_words: int) -> str:
    return " ".join(rng.choice(words) for _ in range(max(1, n_words))).capitalize() + "."


def training_set(preset: Preset, root: Path, processor: Any, seed: int = 0) -> Path:
    """`root/train.json` (LLaVA format) and `root/images/`, written once per workload.

    Answer lengths are drawn in tokens from log-normal distributions (short VQA-like answers
    with images, longer text-only answers), so lengths spread as in LLaVA-665K, where the
    longest sample of a random batch is typically far above its mean. Every sample fits
    `max_length` with the model's own tokenizer and template (answers are shortened until it
    does), so both systems train on exactly the same, untruncated samples."""
    w = preset.work
    data = root / "train.json"
    if data.is_file():
        return data
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = list(ENGLISH) + lexicon(400, seed)
    sample_text = _text(rng, words, 400)
    tokens_per_word = len(processor.tokenizer(sample_text, add_special_tokens=False)["input_ids"]) / 400
    records = []
    for i in range(w.train_records):
        has_image = rng.random() >= w.text_only_share
        turns = rng.choice((1, 1, 1, 2, 2, 3))
        median = (w.answer_tokens_image if has_image else w.answer_tokens_text) / turns ** 0.5
        convs = []
        for t in range(turns):
            question = _text(rng, words, rng.randint(4, 16))
            if t == 0 and has_image:
                question = "<image>\n" + question
            n_words = max(1, round(math.exp(rng.gauss(math.log(median), w.length_sigma)) / tokens_per_word))
            convs += [{"from": "human", "value": question}, {"from": "gpt", "value": _text(rng, words, n_words)}]
        # Shorten the longest answer until the sample fits (long-tailed lengths, but no truncation).
        while len(processor.encode(convs, num_images=int(has_image)).input_ids) > w.max_length:
            longest = max(range(1, len(convs), 2), key=lambda k: len(convs[k]["value"]))
            kept = convs[longest]["value"].split()
            if len(kept) > 1:
                convs[longest]["value"] = " ".join(kept[: len(kept) * 3 // 4])
            elif len(convs) > 2:
                convs = convs[:-2]
            else:
                convs[0]["value"] = " ".join(convs[0]["value"].split()[:3])
        record: dict[str, Any] = {"id": f"b{i}", "conversations": convs}
        if has_image:
            name = f"{i:05d}.png"
            noise_image(seed * 100003 + i, rng.randint(96, 320), rng.randint(96, 320)).save(root / "images" / name)
            record["image"] = f"images/{name}"
        records.append(record)
    tmp = data.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    tmp.replace(data)
    return data
