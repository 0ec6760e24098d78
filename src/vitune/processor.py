"""The LLaVA processor: images -> pixel tensors, conversations -> ids with image placeholders + labels.

It owns everything between raw inputs and the model: image loading and preprocessing (the vision
encoder's own transformers image processor, after LLaVA-1.5's pad-to-square when configured), the
chat template, and the expansion of each `<image>` into `num_image_tokens` placeholder ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from vitune.errors import VituneError
from vitune.images import expand_to_square, load_image
from vitune.model.config import LlavaConfig
from vitune.templates import IMAGE_MARKER, Encoded, Message, encode_conversation, get_template, normalize_conversation


# Longest side an image keeps before being padded to a square (see `preprocess_images`).
MAX_PAD_SIDE = 2048


def shrink_long_side(image: Image.Image, limit: int) -> Image.Image:
    """The image scaled down (aspect kept, each side at least 1 pixel) so its long side is at most `limit`."""
    width, height = image.size
    if max(width, height) <= limit:
        return image
    scale = limit / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


class LlavaProcessor:
    def __init__(self, tokenizer: Any, image_processor: Any, config: LlavaConfig) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.template = get_template(config.template)

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: LlavaConfig | None = None) -> LlavaProcessor:
        from transformers.utils import logging as hf_logging

        config = config or LlavaConfig.load(directory)
        # Both Auto* classes peek at config.json, whose model_type transformers does not know.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            image_processor = AutoImageProcessor.from_pretrained(str(directory))
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(tokenizer, image_processor, config)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))

    # -- images ----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        size = self.image_processor.crop_size if getattr(self.image_processor, "do_center_crop", False) else self.image_processor.size
        if isinstance(size, int):
            return size
        # a dict, or transformers' SizeDict, with height/width or shortest_edge
        side = getattr(size, "height", None) or getattr(size, "shortest_edge", None)
        if side is None and hasattr(size, "get"):
            side = size.get("height") or size.get("shortest_edge")
        if side is None:
            raise VituneError(f"cannot tell the image size from the image processor's size {size!r}")
        return int(side)

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (or paths/bytes) -> [N, 3, H, W] float tensor."""
        pil = [load_image(im) for im in images]
        if self.config.image_aspect_ratio == "pad":
            # A 10000x10 image is a few hundred bytes, but its padded square is 10^8 pixels (over a
            # GB once the image processor has it as floats): bound the square's side first. Images
            # within the bound, which is far above any encoder's input size, are untouched.
            pil = [shrink_long_side(im, max(MAX_PAD_SIDE, 4 * self.image_size)) for im in pil]
            fill = tuple(int(m * 255) for m in self.image_processor.image_mean)  # as LLaVA and transformers do
            pil = [expand_to_square(im, fill) for im in pil]  # type: ignore[arg-type]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    # -- text ------------------------------------------------------------------------------
    def messages(self, conversation: Sequence[dict[str, Any]] | Sequence[Message], where: str = "conversation") -> list[Message]:
        if conversation and isinstance(conversation[0], Message):
            return list(conversation)  # type: ignore[arg-type]
        return normalize_conversation(conversation, where)  # type: ignore[arg-type]

    def encode(
        self,
        conversation: Sequence[dict[str, Any]] | Sequence[Message],
        num_images: int | None = None,
        add_generation_prompt: bool = False,
        where: str = "conversation",
    ) -> Encoded:
        """Ids and labels of a conversation; with `num_images`, checks the `<image>` markers match."""
        messages = self.messages(conversation, where)
        enc = encode_conversation(
            self.template, messages, self.tokenizer, self.config.image_token_id, self.config.num_image_tokens, add_generation_prompt
        )
        if num_images is not None and enc.num_images != num_images:
            raise VituneError(f"{where}: {enc.num_images} <image> markers but {num_images} images")
        return enc

    def encode_prompt(self, conversation: Sequence[dict[str, Any]] | Sequence[Message], images: Sequence[Any] = ()) -> tuple[list[int], torch.Tensor | None]:
        """A generation prompt (ending in the assistant header) and its pixels. Images with no
        `<image>` marker in the text go before the first user message, as LLaVA places them."""
        messages = with_image_markers(self.messages(conversation), len(images))
        enc = self.encode(messages, num_images=len(images), add_generation_prompt=True)
        pixels = self.preprocess_images(images) if images else None
        return enc.input_ids, pixels

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stop_strings(self) -> tuple[str, ...]:
        return self.template.end_strings(self.tokenizer)

    def eos_token_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's EOS and any single-token end marker."""
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for s in self.stop_strings():
            tok = self.tokenizer.convert_tokens_to_ids(s)
            if isinstance(tok, int) and tok != self.tokenizer.unk_token_id and s in self.tokenizer.get_vocab():
                ids.add(tok)
        return ids


def with_image_markers(messages: list[Message], num_images: int) -> list[Message]:
    present = sum(m.content.count(IMAGE_MARKER) for m in messages)
    if present or not num_images:
        return messages
    out = list(messages)
    for i, m in enumerate(out):
        if m.role == "user":
            out[i] = Message("user", (IMAGE_MARKER + "\n") * num_images + m.content)
            return out
    raise VituneError("images were given but the conversation has no user message")
