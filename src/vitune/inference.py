"""Inference in one object: a saved model directory -> answers to conversations with images.

`Pipeline` is what the CLI, the evaluation, the chat and the server share: it loads the model and
processor, turns requests into prompt ids and pixels, and runs them through the batched decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitune.generation import Decoder, GenerationOutput, SamplingParams, StepEvent
from vitune.model.llava import LlavaModel
from vitune.processor import LlavaProcessor

__all__ = ["GenerationOutput", "GenerationRequest", "Pipeline", "SamplingParams", "resolve_device", "resolve_dtype"]


@dataclass
class GenerationRequest:
    """messages: [{"role", "content"}] (or LLaVA from/value turns) with "<image>" markers, one per
    image in order; images without markers go before the first user message."""

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are hundreds of times slower on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


class Pipeline:
    def __init__(self, model: LlavaModel, processor: LlavaProcessor, compile_decode: bool = False) -> None:
        self.model = model.eval()
        self.processor = processor
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.decoder = Decoder(model, processor.decode, processor.eos_token_ids(), pad, processor.stop_strings(),
                               compile_step=compile_decode)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", dtype: str = "auto", compile_decode: bool = False) -> Pipeline:
        """`compile_decode`: small models' decode steps compiled ahead of time (`model.compiled_step`)."""
        dev = resolve_device(device)
        model = LlavaModel.from_pretrained(path, dtype=resolve_dtype(dtype, dev), device=dev)
        return cls(model, LlavaProcessor.from_pretrained(path, model.config), compile_decode=compile_decode)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.language_model.config, "max_position_embeddings", 2048))

    def prepare(self, request: GenerationRequest) -> tuple[list[int], torch.Tensor | None]:
        return self.processor.encode_prompt(request.messages, request.images)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        batch_size: int = 8,
        on_event: Callable[[StepEvent], None] | None = None,
    ) -> list[GenerationOutput]:
        """Answers in request order. Requests are batched by prompt length to limit padding."""
        prepared = [self.prepare(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(prepared[i][0]))
        results: list[GenerationOutput | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]

            def relay(event: StepEvent, chunk: list[int] = chunk) -> None:
                if on_event is not None:
                    on_event(StepEvent(chunk[event.row], event.text, event.finish_reason, event.output_ids))

            outs = self.decoder.generate(
                [prepared[i][0] for i in chunk], [prepared[i][1] for i in chunk], [requests[i].params for i in chunk],
                on_event=relay if on_event is not None else None,  # no listener: the decoder may skip streaming work
            )
            for i, out in zip(chunk, outs, strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text pieces of one answer as they are generated."""
        ids, pixels = self.prepare(request)
        for event in self.decoder.decode_steps([ids], [pixels], [request.params]):
            if event.text:
                yield event.text
