"""The LLaVA model's configuration: what a checkpoint directory's config.json says it is.

Both backbones' own transformers configs are stored inline, so a checkpoint rebuilds its
architecture without the original backbone paths; nothing is inferred from directory names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vitune.errors import VituneError

MODEL_TYPE = "vitune_llava"
FORMAT_VERSION = 1


@dataclass
class LlavaConfig:
    vision_config: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=dict)
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select: str = "patch"  # patch (drop CLS) | cls_patch
    vision_has_cls: bool = True
    image_token_id: int = -1
    num_image_tokens: int = 0
    template: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"  # pad | crop
    model_type: str = MODEL_TYPE
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.vision_feature_select not in ("patch", "cls_patch"):
            raise VituneError(f"vision_feature_select must be 'patch' or 'cls_patch', got {self.vision_feature_select!r}")
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise VituneError(f"image_aspect_ratio must be 'pad' or 'crop', got {self.image_aspect_ratio!r}")

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        from vitune.io import atomic_write_json

        atomic_write_json(Path(directory) / "config.json", self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> LlavaConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise VituneError(f"{directory}: no config.json (not a vitune model directory)")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("model_type") != MODEL_TYPE:
            raise VituneError(
                f"{path}: model_type is {data.get('model_type')!r}, not {MODEL_TYPE!r}; "
                "for transformers' LLaVA or the original release use `vitune import`"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise VituneError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)
