"""Vision encoders: loading a transformers vision tower and selecting the features LLaVA uses.

The family of a checkpoint is read from its config's `model_type` (exact match), never guessed
from its path. LLaVA takes the patch features of one layer (the penultimate by default) or the
concatenation of several, without the CLS token (`patch`) or with it (`cls_patch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, SiglipVisionConfig, SiglipVisionModel

from vitune.errors import VituneError
from vitune.registry import Registry


@dataclass(frozen=True)
class VisionFamily:
    model_class: type[nn.Module]
    config_class: type[PretrainedConfig]
    has_cls: bool


# Keys are checkpoint model_types: a full CLIP/SigLIP checkpoint loads its vision tower alone.
VISION_FAMILIES: Registry[VisionFamily] = Registry("vision model type")
for _name, _family in (
    ("clip", VisionFamily(CLIPVisionModel, CLIPVisionConfig, True)),
    ("clip_vision_model", VisionFamily(CLIPVisionModel, CLIPVisionConfig, True)),
    ("siglip", VisionFamily(SiglipVisionModel, SiglipVisionConfig, False)),
    ("siglip_vision_model", VisionFamily(SiglipVisionModel, SiglipVisionConfig, False)),
):
    VISION_FAMILIES.add(_name, _family)


def load_vision_tower(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """A pretrained vision tower by local path or hub id."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type in VISION_FAMILIES:
        family = VISION_FAMILIES.get(config.model_type)
        return family.model_class.from_pretrained(path, dtype=dtype)
    # Any other transformers vision model that returns hidden states.
    return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def vision_tower_from_config(config_dict: dict[str, Any]) -> nn.Module:
    """An uninitialised tower of the architecture a saved vitune checkpoint describes."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type in VISION_FAMILIES:
        family = VISION_FAMILIES.get(model_type)
        return family.model_class(family.config_class.from_dict(config_dict))
    if model_type is None:
        raise VituneError("vision_config has no model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config_dict))


class VisionEncoder(nn.Module):
    """The tower plus LLaVA's feature selection: pixels [N, 3, H, W] -> features [N, T, D * layers]."""

    def __init__(self, tower: nn.Module, feature_layers: list[int], select: str, has_cls: bool) -> None:
        super().__init__()
        self.tower = tower
        self.feature_layers = list(feature_layers)
        self.drop_first = select == "patch" and has_cls

    @property
    def hidden_size(self) -> int:
        return int(self.tower.config.hidden_size) * len(self.feature_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        feats = [out.hidden_states[layer] for layer in self.feature_layers]
        if self.drop_first:
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


def count_tokens(tower: nn.Module, image_size: int) -> tuple[int, bool]:
    """(sequence length, has CLS) of one image, measured rather than assumed."""
    cfg = tower.config
    patch = int(getattr(cfg, "patch_size", 0) or 0)
    with torch.no_grad():
        param = next(tower.parameters())
        dummy = torch.zeros(1, int(getattr(cfg, "num_channels", 3)), image_size, image_size, dtype=param.dtype, device=param.device)
        seq = tower(pixel_values=dummy, output_hidden_states=True, return_dict=True).hidden_states[-1].shape[1]
    has_cls = bool(patch) and seq == (image_size // patch) ** 2 + 1
    return int(seq), has_cls
