"""The reference: what a user would run without vitune, on the same weights.

transformers' `LlavaForConditionalGeneration` loaded from vitune's own export (`export_hf`), in
fp32 on the CPU. Generation is its `generate` (greedy, `min_new_tokens` = `max_new_tokens` so
every row runs to full length). Training is a plain loop in the original LLaVA recipe's manner
without modality grouping: random batches padded to the longest sample, the model's own loss
(logits over every position), `AdamW` with PyTorch's defaults, gradient clipping at 1.0, the
vision tower frozen (stage 2: projector and LLM learn).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from vitune.templates import IGNORE_INDEX


def load_reference(hf_dir: Path) -> Any:
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"{hf_dir}: the export does not load cleanly into transformers: {bad}")
    return model.eval()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def generate(model: Any, prompts: list[list[int]], pixels: torch.Tensor, new_tokens: int, pad_id: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


class ReferenceTrainer:
    """One epoch of the plain loop per `epoch()` call; the optimizer persists across calls."""

    def __init__(self, hf_dir: Path, samples: list[dict[str, Any]], processor: Any, batch_size: int, lr: float = 2e-5,
                 seed: int = 0) -> None:
        self.model = load_reference(hf_dir)
        self.model.model.vision_tower.requires_grad_(False)
        self.model.train()
        self.model.model.vision_tower.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.samples = samples  # {"input_ids", "labels", "image": path | None}
        self.processor = processor
        self.batch_size = batch_size
        self.pad_id = processor.tokenizer.pad_token_id
        self.rng = random.Random(seed)
        self.last_epoch: list[list[int]] = []  # each step's sample indices in the last epoch

    def _batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [r["image"] for r in rows if r["image"] is not None]
        if images:
            batch["pixel_values"] = self.processor.preprocess_images(images)
        return batch

    def epoch(self) -> list[tuple[float, float]]:
        """Train one epoch (full batches only); returns (elapsed, CPU) seconds at the end of each
        step, the first entry being the start of the epoch."""
        order = list(range(len(self.samples)))
        self.rng.shuffle(order)
        marks = [(time.perf_counter(), time.process_time())]
        self.last_epoch = []
        for s in range(len(order) // self.batch_size):
            self.last_epoch.append(order[s * self.batch_size:(s + 1) * self.batch_size])
            rows = [self.samples[i] for i in self.last_epoch[-1]]
            loss = self.model(**self._batch(rows)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            marks.append((time.perf_counter(), time.process_time()))
        return marks
