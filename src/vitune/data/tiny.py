"""Tiny LLaVA-format training data with Pillow images, for tests and quick benchmarks.

Each image is a coloured shape on a plain background; stage-1 records caption it, stage-2
records ask about its colour and shape in one or two turns, and a share of text-only records
mixes modalities. The answers depend on the pixels, so a model that learns to see lowers its
loss further than one that only learns the text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vitune.io import atomic_write_jsonl, atomic_write_text

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(color: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    r = size // 3 + rng.randint(-2, 2)
    cx, cy = size // 2 + rng.randint(-3, 3), size // 2 + rng.randint(-3, 3)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image


def make_tiny_dataset(root: str | Path, n: int = 32, stage: int = 2, text_only: float = 0.0, seed: int = 0,
                      image_size: int = 32, fmt: str = "json") -> Path:
    """Write `root/images/*.png` and `root/stage{stage}.{json|jsonl}`; returns the data file."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        name = f"{i:05d}.png"
        path = root / "images" / name
        if not path.exists():
            draw_shape(color, shape, image_size, seed=seed * 100003 + i).save(path)
        if rng.random() < text_only:
            records.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"what color is a {color} {shape}?"},
                {"from": "gpt", "value": f"the {shape} is {color}."}]})
            continue
        if stage == 1:
            convs = [{"from": "human", "value": "<image>\ndescribe the image."},
                     {"from": "gpt", "value": f"a {color} {shape}."}]
        else:
            convs = [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                     {"from": "gpt", "value": f"the shape is {color}."}]
            if rng.random() < 0.5:
                convs += [{"from": "human", "value": "what shape is it?"}, {"from": "gpt", "value": f"it is a {shape}."}]
        records.append({"id": f"s{i}", "image": f"images/{name}", "conversations": convs})
    out = root / f"stage{stage}.{fmt}"
    if fmt == "json":
        atomic_write_text(out, json.dumps(records, indent=1))
    else:
        atomic_write_jsonl(out, records)
    return out
