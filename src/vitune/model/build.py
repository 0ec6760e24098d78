"""Assembling a new LLaVA model from two pretrained backbones (`vitune build`).

The tokenizer gains the `<image>` placeholder token (and a pad token, and the chat template's
special tokens, when missing); the LLM's embeddings are resized to match; the projector is
freshly initialised. The number of image tokens is measured from the encoder, not assumed.
"""

from __future__ import annotations

import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from vitune.model.config import LlavaConfig
from vitune.model.llava import LlavaModel
from vitune.model.vision import count_tokens, load_vision_tower, vision_config_dict
from vitune.processor import LlavaProcessor
from vitune.templates import IMAGE_MARKER, get_template


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

    text_config = language_model.config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        text_config.pop(key, None)
    config = LlavaConfig(
        vision_config=vision_config_dict(tower),
        text_config=text_config,
        projector=projector,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_MARKER),
        template=template,
        image_aspect_ratio=image_aspect_ratio,
    )
    processor = LlavaProcessor(tokenizer, image_processor, config)
    seq, has_cls = count_tokens(tower, processor.image_size)
    config.vision_has_cls = has_cls
    config.num_image_tokens = seq - 1 if (has_cls and vision_feature_select == "patch") else seq
    torch.manual_seed(seed)
    model = LlavaModel(config, vision_tower=tower, language_model=language_model).to(dtype)
    return model.eval(), processor
