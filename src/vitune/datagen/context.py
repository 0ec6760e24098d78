"""Symbolic image contexts: COCO annotation files -> annotations JSONL, and the teacher's context text.

The annotations JSONL is the one input format of data generation (the synthetic world writes it;
LLaVA published its COCO benchmark contexts in it): one image per line,
`{"id", "image", "captions": [...], "instances": [{"category", "bbox": [x1, y1, x2, y2]}]}` with
boxes normalised to [0, 1]. The teacher sees the captions, then one line per object
`category: [x1, y1, x2, y2]` with 3 decimals, as in the paper. Synthetic-world objects carry
colour/size attributes, which are written in front of the category ("small red circle: [...]")
so a language-only teacher knows them; COCO objects have none, so their lines are the paper's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitune.errors import VituneError
from vitune.io import read_json
from vitune.world.scene import Scene


def context_text(scene: Scene, attributes: bool = True) -> str:
    """Captions, one a line, then `category: [x1, y1, x2, y2]` per object."""
    lines = [c.strip() for c in scene.captions if c.strip()]
    if lines:
        lines.append("")
    for inst in scene.instances:
        name = inst.category
        if attributes:
            name = " ".join(w for w in (inst.size, inst.color, inst.category) if w)
        box = ", ".join(f"{v:.3f}" for v in inst.bbox)
        lines.append(f"{name}: [{box}]")
    return "\n".join(lines)


def load_json(path: str | Path, what: str) -> Any:
    return read_json(path, f"{what} file")


def _require(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise VituneError(f"{where}: missing field {key!r}")
    return obj[key]


def coco_to_annotations(captions: dict, instances: dict | None = None, image_prefix: str = "",
                        captions_path: str = "captions", instances_path: str = "instances") -> list[dict]:
    """COCO 2014/2017 `captions_*.json` (+ optional `instances_*.json`) -> annotation records.

    Pixel boxes `[x, y, w, h]` become `[x1, y1, x2, y2]` normalised by the image size and clipped
    to [0, 1]; category ids become names. Images without captions are left out; the id is the
    file name's stem (`000000391895`), the image path `image_prefix + file_name`."""
    images: dict[int, dict] = {}
    for i, img in enumerate(_require(captions, "images", captions_path)):
        where = f"{captions_path}: images[{i}]"
        images[_require(img, "id", where)] = {
            "file_name": str(_require(img, "file_name", where)),
            "width": float(_require(img, "width", where)),
            "height": float(_require(img, "height", where)),
        }
    caps: dict[int, list[str]] = {}
    for i, ann in enumerate(_require(captions, "annotations", captions_path)):
        where = f"{captions_path}: annotations[{i}]"
        image_id = _require(ann, "image_id", where)
        if image_id not in images:
            raise VituneError(f"{where}: image_id {image_id} is not in the file's images")
        caps.setdefault(image_id, []).append(" ".join(str(_require(ann, "caption", where)).split()))

    boxes: dict[int, list[dict]] = {}
    if instances is not None:
        names = {
            _require(c, "id", f"{instances_path}: categories[{i}]"): str(_require(c, "name", f"{instances_path}: categories[{i}]"))
            for i, c in enumerate(_require(instances, "categories", instances_path))
        }
        inst_images = {img["id"]: img for img in instances.get("images", []) if isinstance(img, dict) and "id" in img}
        for i, ann in enumerate(_require(instances, "annotations", instances_path)):
            where = f"{instances_path}: annotations[{i}]"
            image_id = _require(ann, "image_id", where)
            size = images.get(image_id) or inst_images.get(image_id)
            if size is None:
                continue  # an image without captions is not used
            cat = _require(ann, "category_id", where)
            if cat not in names:
                raise VituneError(f"{where}: category_id {cat} is not in the file's categories")
            bbox = _require(ann, "bbox", where)
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise VituneError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            width, height = float(size["width"]), float(size["height"])
            if width <= 0 or height <= 0:
                raise VituneError(f"{where}: image {image_id} has no size")
            norm = [x / width, y / height, (x + w) / width, (y + h) / height]
            norm = [round(min(1.0, max(0.0, v)), 3) for v in norm]
            boxes.setdefault(image_id, []).append({"category": names[cat], "bbox": norm})

    records = []
    for image_id in sorted(caps):
        info = images[image_id]
        stem = Path(info["file_name"]).stem
        records.append({
            "id": stem,
            "image": image_prefix + info["file_name"],
            "captions": caps[image_id],
            "instances": boxes.get(image_id, []),
        })
    return records
