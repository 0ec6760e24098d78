"""The symbolic scene: the annotation record every part of vitune reads, and its geometry.

A scene is one line of `W/{train,val,test}.jsonl`, in the annotation format that LLaVA's data
generation reads (captions + object boxes normalised to [0, 1]) plus each object's own
attributes (colour, size), which the rules teacher and the synthetic-world evaluation use:

    {"id": "train-000001", "image": "images/train-000001.png", "captions": ["...", ...],
     "instances": [{"category": "circle", "bbox": [x1, y1, x2, y2], "color": "red", "size": "small"}]}

Positions and relations are derived from the boxes here, once, so the captions, the rules teacher
and the evaluation all describe a scene in the same words.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vitune.errors import VituneError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
# The image is cut into a 3x3 grid for "where is it" questions.
HORIZONTAL: tuple[str, ...] = ("left", "center", "right")
VERTICAL: tuple[str, ...] = ("top", "middle", "bottom")


@dataclass(frozen=True)
class Instance:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in [0, 1], y down
    color: str = ""
    size: str = ""

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.bbox
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def name(self) -> str:
        """'red circle': the colour attribute plus the category, as captions say it."""
        return f"{self.color} {self.category}".strip()

    def to_json(self) -> dict:
        out: dict = {"category": self.category, "bbox": [round(v, 3) for v in self.bbox]}
        if self.color:
            out["color"] = self.color
        if self.size:
            out["size"] = self.size
        return out


@dataclass(frozen=True)
class Scene:
    id: str
    image: str
    captions: tuple[str, ...]
    instances: tuple[Instance, ...]
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "image": self.image,
            "captions": list(self.captions),
            "instances": [inst.to_json() for inst in self.instances],
            **self.extra,
        }

    @classmethod
    def from_json(cls, record: dict, where: str = "scene") -> Scene:
        try:
            instances = tuple(
                Instance(
                    category=str(inst["category"]),
                    bbox=tuple(float(v) for v in inst["bbox"]),  # type: ignore[arg-type]
                    color=str(inst.get("color", "")),
                    size=str(inst.get("size", "")),
                )
                for inst in record.get("instances", [])
            )
            known = {"id", "image", "captions", "instances"}
            return cls(
                id=str(record["id"]),
                image=str(record.get("image", "")),
                captions=tuple(str(c) for c in record.get("captions", [])),
                instances=instances,
                extra={k: v for k, v in record.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise VituneError(f"{where}: bad annotation record ({type(err).__name__}: {err})") from err
        

def read_scenes(path: str | Path) -> Iterator[Scene]:
    """Scenes of an annotations JSONL file, with errors naming the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise VituneError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            yield Scene.from_json(record, where=f"{path}:{lineno}")


def horizontal_position(inst: Instance) -> str:
    x, _ = inst.center
    return HORIZONTAL[min(int(x * 3), 2)]


def vertical_position(inst: Instance) -> str:
    _, y = inst.center
    return VERTICAL[min(int(y * 3), 2)]


def position_phrase(inst: Instance) -> str:
    """Where an object is, in words: 'top left', 'center', 'bottom', ..."""
    h, v = horizontal_position(inst), vertical_position(inst)
    if h == "center" and v == "middle":
        return "center"
    if h == "center":
        return v
    if v == "middle":
        return h
    return f"{v} {h}"


def relation(a: Instance, b: Instance, margin: float = 0.1, dominance: float = 1.5) -> str | None:
    """The clear spatial relation of `a` to `b` ('left of', 'right of', 'above', 'below'), or None
    when there is none to say (so nothing is asked or claimed about the pair): the centres are too
    close on both axes, or the pair is near-diagonal. A pair 0.30 to the left and 0.28 above is as
    much "above" as "left of": one axis must lead the other by `dominance` for the answer to be
    the only true one of the four (at 1.0, 22% of the test scenes' pairs had two true answers)."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    lead, other = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if lead < margin or lead < dominance * other:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"
