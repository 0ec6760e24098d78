"""Rendering the synthetic world: scene layouts, their pictures (Pillow) and the annotation files.

`render_world` writes `W/images/<id>.png`, `W/{train,val,test}.jsonl` (one `scene.Scene` record a
line) and `W/world.json` (the arguments and vocabulary it was made with). Each scene is drawn
from its own random stream, seeded by (seed, split, index), so scenes can be rendered in any
order or in parallel and the same arguments give byte-identical files.

Layout rules, chosen so every caption is visually checkable at 48 px:
- each object sits in its own cell of the 3x3 grid that `scene.position_phrase` names, its
  centre kept away from the cell borders, so "top left" is never a coin flip;
- boxes never overlap (nothing is hidden), so counts and shapes are always visible;
- objects are big against a ViT patch (small ~ a quarter, large ~ two fifths of the image side)
  and drawn 4x supersampled, so silhouettes survive the downscale.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vitune.errors import VituneError
from vitune.io import atomic_write_json, atomic_write_text
from vitune.world.captions import captions_for
from vitune.world.scene import COLORS, SHAPES, SIZES, Instance, Scene

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_OBJECTS = 4
SUPERSAMPLE = 4
# Side of an object's square footprint, as a fraction of the image side, per size class.
SIDE_RANGE: dict[str, tuple[float, float]] = {"small": (0.22, 0.27), "large": (0.36, 0.42)}
# How far an object's centre stays from the borders of its grid cell.
CELL_MARGIN = 0.05
# Base RGB per colour name; each object jitters around it.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
COLOR_JITTER = 18
MIN_SIZE, MAX_SIZE = 16, 1024


@dataclass(frozen=True)
class Layout:
    """What is in one scene, before it is drawn: objects with boxes, how to draw each, background."""

    instances: tuple[Instance, ...]
    strokes: tuple[tuple[float, float, float, float], ...]  # per instance: origin x, y, radius, angle
    rgbs: tuple[tuple[int, int, int], ...]
    background: tuple[int, int, int]


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs.
    return random.Random(f"vitune-world/{seed}/{split}/{index}")


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Polygon of a shape centred on 0 with radius about 1 (y down); circle has none."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "star":
        return [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi * k / 5),
                -(1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi * k / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        a, b = 0.32, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    raise VituneError(f"world: no drawing for shape {shape!r} (known: circle, {', '.join(SHAPES[1:])})")


def _outline(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in _unit_outline(shape)]


def _box(shape: str, cx: float, cy: float, radius: float, angle: float) -> tuple[float, float, float, float]:
    if shape == "circle":
        return cx - radius, cy - radius, cx + radius, cy + radius
    pts = _outline(shape, cx, cy, radius, angle)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _overlaps(a: Sequence[float], b: Sequence[float], gap: float = 0.02) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def sample_layout(rng: random.Random) -> Layout:
    """A random scene: 1-4 objects, one per grid cell, no two boxes overlapping."""
    wanted = rng.randint(1, MAX_OBJECTS)
    cells = [(i, j) for i in range(3) for j in range(3)]
    rng.shuffle(cells)
    instances: list[Instance] = []
    strokes: list[tuple[float, float, float, float]] = []
    rgbs: list[tuple[int, int, int]] = []
    for cell in cells:
        if len(instances) == wanted:
            break
        shape, color = rng.choice(SHAPES), rng.choice(COLORS)
        for size in (rng.choice(SIZES), "small"):
            radius = rng.uniform(*SIDE_RANGE[size]) / 2
            angle = rng.uniform(-12, 12) if shape != "circle" else 0.0
            # Box of the shape drawn at the origin: its centre offset and half extents.
            x1, y1, x2, y2 = _box(shape, 0.0, 0.0, radius, angle)
            hw, hh, ox, oy = (x2 - x1) / 2, (y2 - y1) / 2, (x1 + x2) / 2, (y1 + y2) / 2
            # The box centre stays inside its cell (away from borders) and the box in the image.
            lo = (max(cell[0] / 3 + CELL_MARGIN, hw + 0.01), max(cell[1] / 3 + CELL_MARGIN, hh + 0.01))
            hi = (min((cell[0] + 1) / 3 - CELL_MARGIN, 1 - hw - 0.01), min((cell[1] + 1) / 3 - CELL_MARGIN, 1 - hh - 0.01))
            if lo[0] > hi[0] or lo[1] > hi[1]:
                continue
            cx, cy = rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])
            box = (cx - hw, cy - hh, cx + hw, cy + hh)
            if any(_overlaps(box, other.bbox) for other in instances):
                continue
            instances.append(Instance(shape, box, color, size))
            strokes.append((cx - ox, cy - oy, radius, angle))
            rgbs.append(tuple(min(255, max(0, v + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for v in RGB[color]))  # type: ignore[misc]
            break
    if not instances:  # a lone object always fits; never write an empty scene if that changes
        raise VituneError("world: could not place any object")
    grey = rng.randint(200, 240)
    background = (grey + rng.randint(-8, 8), grey + rng.randint(-8, 8), grey + rng.randint(-8, 8))
    return Layout(tuple(instances), tuple(strokes), tuple(rgbs), background)  # type: ignore[arg-type]


def draw(layout: Layout, size: int) -> Image.Image:
    """The scene as an RGB image of side `size`, drawn large and downsampled (antialiasing)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), layout.background)
    pen = ImageDraw.Draw(image)
    for inst, (x, y, radius, angle), rgb in zip(layout.instances, layout.strokes, layout.rgbs):
        if inst.category == "circle":
            pen.ellipse([(x - radius) * big, (y - radius) * big, (x + radius) * big, (y + radius) * big], fill=rgb)
        else:
            pen.polygon([(px * big, py * big) for px, py in _outline(inst.category, x, y, radius, angle)], fill=rgb)
    return image.resize((size, size), Image.Resampling.BOX)


def make_scene(seed: int, split: str, index: int, size: int) -> tuple[Scene, bytes]:
    """One scene's record and its PNG bytes."""
    rng = scene_rng(seed, split, index)
    layout = sample_layout(rng)
    scene_id = f"{split}-{index:06d}"
    captions = captions_for(layout.instances, rng)
    buf = io.BytesIO()
    draw(layout, size).save(buf, format="PNG", compress_level=1)
    scene = Scene(id=scene_id, image=f"images/{scene_id}.png", captions=tuple(captions), instances=layout.instances)
    return scene, buf.getvalue()


def _write_image(path: Path, data: bytes) -> None:
    # Temp file + rename like vitune.io's writers, without their fsyncs: thousands of images per
    # world, and a torn one is never renamed into place.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _render_chunk(job: tuple[str, int, int, int, int, str]) -> list[str]:
    """Render scenes [start, stop) of a split, write their images, return their JSON lines."""
    out, seed, start, stop, size, split = job
    images = Path(out) / "images"
    lines = []
    for index in range(start, stop):
        scene, png = make_scene(seed, split, index, size)
        _write_image(images / f"{scene.id}.png", png)
        lines.append(json.dumps(scene.to_json(), separators=(", ", ": ")))
    return lines


def _jobs(out: Path, seed: int, split: str, count: int, size: int, chunk: int) -> Iterator[tuple[str, int, int, int, int, str]]:
    for start in range(0, count, chunk):
        yield (str(out), seed, start, min(start + chunk, count), size, split)


def render_world(out: Path, scenes: int, eval_scenes: int, seed: int, size: int, workers: int | None = None) -> None:
    """Render `scenes` training scenes and `eval_scenes` each for val and test under `out`.

    Same arguments, same bytes: each scene has its own seeded stream and the JSONL lines are
    written in index order whatever the number of worker processes."""
    out = Path(out)
    if scenes < 1 or eval_scenes < 0:
        raise VituneError(f"world render: need --scenes >= 1 and --eval-scenes >= 0 (got {scenes}, {eval_scenes})")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise VituneError(f"world render: --size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels (got {size})")
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"train": scenes, "val": eval_scenes, "test": eval_scenes}
    total = sum(counts.values())
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    chunk = 256
    from tqdm import tqdm

    with tqdm(total=total, desc="render", unit="scene", disable=None) as bar:
        pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and total > 2 * chunk else None
        try:
            for split in SPLITS:
                jobs = list(_jobs(out, seed, split, counts[split], size, chunk))
                results = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
                lines: list[str] = []
                for job, chunk_lines in zip(jobs, results):
                    lines.extend(chunk_lines)
                    bar.update(job[3] - job[2])
                atomic_write_text(out / f"{split}.jsonl", "".join(line + "\n" for line in lines))
        finally:
            if pool:
                pool.close()
                pool.join()
    meta = {
        "seed": seed,
        "size": size,
        "scenes": counts,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "max_objects": MAX_OBJECTS,
    }
    atomic_write_json(out / "world.json", meta)


def read_world_meta(world: Path) -> dict:
    """`W/world.json`, with an error naming the file when it is missing or broken."""
    path = Path(world) / "world.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise VituneError(f"{path}: not found; is {world} a world made by `vitune world render`?") from err
    except json.JSONDecodeError as err:
        raise VituneError(f"{path}: not valid JSON ({err.msg})") from err
