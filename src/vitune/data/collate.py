"""Batching samples: right padding, labels -100 on padding, the attention mask, and the images.

Pixels are concatenated in placeholder order (sample by sample, image by image), which is the
order the model fills `<image>` placeholders in. Every image also keeps its global key, so the
trainer can use cached vision features instead of pixels; `pixel_keys` says which images the
`pixel_values` rows are. Samples whose images failed to load at this late stage (skip mode)
arrive as `bad` entries and are passed on for the quarantine, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vitune.templates import IGNORE_INDEX


class Collator:
    """`preprocess`: decoded images -> [N, 3, H, W] (the processor's `preprocess_images`), called once
    per batch: the image processor's per-call overhead is several times its per-image cost."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1,
                 preprocess: Callable[[list[Any]], torch.Tensor] | None = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))
        self.preprocess = preprocess

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        bad = [s["bad"] for s in samples if "bad" in s]
        samples = [s for s in samples if "bad" not in s]
        longest = max((len(s["input_ids"]) for s in samples), default=0)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(samples), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(samples), width), dtype=np.int64)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[row, :n] = s["input_ids"]
            labels[row, :n] = s["labels"]
            mask[row, :n] = 1
        keys = [s["image_keys"] for s in samples]
        images = [im for s in samples if s["images"] is not None for im in s["images"]]
        pixel_keys = [s["image_keys"] for s in samples if s["images"] is not None]
        pixels = None
        if images:
            if self.preprocess is None:
                raise ValueError("the batch has images but the collator has no preprocess function")
            pixels = self.preprocess(images)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
            "image_keys": torch.from_numpy(np.concatenate(keys).astype(np.int64)) if keys else torch.zeros(0, dtype=torch.long),
            "pixel_values": pixels,
            "pixel_keys": torch.from_numpy(np.concatenate(pixel_keys).astype(np.int64)) if pixel_keys else torch.zeros(0, dtype=torch.long),
            "indices": [s["index"] for s in samples],
            "bad": bad,
        }
