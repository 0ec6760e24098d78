"""Assembling a new LLaVA model from two pretrained backbones (`vitune build`).

The tokenizer gains the `<image>` placeholder token (and a pad token, and the chat template's
special tokens, when missing); the LLM's embeddings are resized to match; the projector is
freshly initialised. The number of image tokens is measured from the encoder, not assumed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from vitune.errors import VituneError
from vitune.model.config import LlavaConfig
from vitune.model.llava import LlavaModel
from vitune.model.vision import count_tokens, load_vision_tower
from vitune.processor import LlavaProcessor
from vitune.templates import IMAGE_MARKER, get_template

# Keys of a saved transformers config that describe the file, not the model.
CONFIG_NOISE = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def prepare_tokenizer(tokenizer, template_name: str):
    """Add what LLaVA needs to a text tokenizer: `<image>`, a pad token, the template's specials."""
    template = get_template(template_name)
    specials = [t for t in (IMAGE_MARKER, *template.special_tokens) if t not in tokenizer.get_vocab()]
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads Llama with unk; a tokenizer without unk gets a dedicated pad token.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_llava(
    vision: str,
    llm: str,
    projector: str = "mlp2x_gelu",
    template: str = "vicuna_v1",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select: str = "patch",
    image_aspect_ratio: str = "pad",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[LlavaModel, LlavaProcessor]:
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(llm, trust_remote_code=trust_remote_code), template)
    language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, trust_remote_code=trust_remote_code)
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    tower = load_vision_tower(vision, dtype=dtype, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(vision)

    torch.manual_seed(seed)  # the projector's initialisation
    model, processor = assemble(tower, language_model, tokenizer, image_processor, projector, vision_feature_layer,
                                vision_feature_select, image_aspect_ratio, template)
    return model.to(dtype).eval(), processor


def clean_config(config: Any) -> dict[str, Any]:
    """A transformers config as a plain dict, without the keys that describe a file rather than a model."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in CONFIG_NOISE:
        data.pop(key, None)
    return data


def assemble(
    tower: nn.Module,
    language_model: nn.Module,
    tokenizer: Any,
    image_processor: Any,
    projector: str,
    vision_feature_layer: int | list[int],
    vision_feature_select: str,
    image_aspect_ratio: str,
    template: str,
) -> tuple[LlavaModel, LlavaProcessor]:
    """A LlavaModel around existing tower and LLM modules (the projector is created here: fresh for
    `vitune build`, loaded by importers), with its config measured from the modules themselves."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    if not isinstance(image_token_id, int) or IMAGE_MARKER not in tokenizer.get_vocab():
        raise VituneError(f"the tokenizer has no {IMAGE_MARKER} token")
    config = LlavaConfig(
        vision_config=clean_config(tower.config),
        text_config=clean_config(language_model.config),
        projector=projector,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        image_token_id=image_token_id,
        template=template,
        image_aspect_ratio=image_aspect_ratio,
    )
    processor = LlavaProcessor(tokenizer, image_processor, config)
    seq, has_cls = count_tokens(tower, processor.image_size)
    config.vision_has_cls = has_cls
    config.num_image_tokens = seq - 1 if (has_cls and vision_feature_select == "patch") else seq
    model = LlavaModel(config, vision_tower=tower, language_model=language_model)
    return model.eval(), processor
