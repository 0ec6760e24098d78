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
    """The tower plus LLaVA's feature selection: pixels [N, 3, H, W] -> features [N, T, D * layers].

    For the ViT families whose parts it knows (embeddings, an optional pre-norm, a list of encoder
    layers) it runs the layers only up to the deepest one selected: LLaVA reads layer -2, so the
    last layer, the post-norm and SigLIP's pooling head are never computed (1/12 of a CLIP-B
    tower's work, 1/24 of CLIP-L's). Other towers run whole, with all hidden states.
    """

    def __init__(self, tower: nn.Module, feature_layers: list[int], select: str, has_cls: bool) -> None:
        super().__init__()
        self.tower = tower
        self.feature_layers = list(feature_layers)
        self.drop_first = select == "patch" and has_cls

    @property
    def hidden_size(self) -> int:
        return int(self.tower.config.hidden_size) * len(self.feature_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parts = _vit_parts(self.tower)
        if parts is None:
            out = self.tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            feats = [out.hidden_states[layer] for layer in self.feature_layers]
        else:
            feats = _run_to_layers(*parts, pixel_values, self.feature_layers)
        if self.drop_first:
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


def _vit_parts(tower: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.ModuleList] | None:
    """(embeddings, pre-norm or None, encoder layers) of a CLIP/SigLIP vision model, else None.
    Older transformers nest them under `vision_model`."""
    core = getattr(tower, "vision_model", tower)
    if not isinstance(tower.config, (CLIPVisionConfig, SiglipVisionConfig)):
        return None
    embeddings, encoder = getattr(core, "embeddings", None), getattr(core, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList):
        return None
    return embeddings, getattr(core, "pre_layrnorm", None), layers


def _run_to_layers(
    embeddings: nn.Module, pre_norm: nn.Module | None, layers: nn.ModuleList, pixel_values: torch.Tensor, feature_layers: list[int]
) -> list[torch.Tensor]:
    # hidden state i is the input of layer i (0: the embeddings after the pre-norm), as in
    # transformers' `hidden_states`, so negative indices count from len(layers) + 1
    n_states = len(layers) + 1
    for layer in feature_layers:
        if not -n_states <= layer < n_states:
            raise VituneError(f"vision_feature_layer {layer} is out of range for a tower of {len(layers)} layers")
    wanted = [layer % n_states for layer in feature_layers]
    hidden = embeddings(pixel_values)
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    states = {0: hidden}
    for i, layer in enumerate(layers[: max(wanted)], start=1):
        hidden = layer(hidden, None)
        if isinstance(hidden, tuple):  # transformers 4.x layers return (hidden, attentions)
            hidden = hidden[0]
        if i in wanted:
            states[i] = hidden
    return [states[i] for i in wanted]


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
