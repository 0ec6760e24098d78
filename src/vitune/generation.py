"""Our decoding loop: KV-cached, batched, streaming generation over the LLaVA model.

Prompts of different lengths and images are left-padded into one batch; image features are
computed once, in the prefill; each decode step feeds one token per row. Rows finish on an EOS
token, a stop string or their token budget, and finished rows leave the batch (their KV cache rows
are dropped) so the rest run at the smaller batch size. Sampling is per row: each request has its
own temperature, top-p, top-k, repetition penalty and seed, so one batch can serve many clients.

`decode_steps` is a generator of text deltas (the unit of streaming); `generate` drains it.
Text is detokenized incrementally (a few tokens around the newest one per step, as TGI and vLLM
do), so a step's cost does not grow with the length of the answer; a row with no stop strings
that nobody streams is detokenized once, when it finishes. The final text of a row is always the
tokenizer's decoding of all its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from vitune.errors import VituneError
from vitune.model.fast_lm import FastLM, supports


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if self.max_new_tokens < 1:
            raise VituneError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise VituneError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise VituneError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise VituneError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise VituneError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class GenerationOutput:
    text: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # stop | length | cancelled


@dataclass
class StepEvent:
    """New text for one row; `finish_reason` is set on its last event."""

    row: int
    text: str
    finish_reason: str | None = None
    output_ids: list[int] | None = None  # all new tokens, on the last event


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already streamed
    text: str = ""
    finish: str | None = None
    raw: str = ""  # incremental decoding of `out[:read]`
    prefix: int = 0  # `out[prefix:read]` is the context that the next delta is decoded after
    read: int = 0


class _HFRunner:
    """transformers' own forward and DynamicCache, for LLMs the lean path does not cover."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.cache = DynamicCache()

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = mask
        self.next_pos = positions[:, -1] + 1
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        out = self.lm(input_ids=tokens.view(-1, 1), attention_mask=self.mask, position_ids=self.next_pos.view(-1, 1),
                      past_key_values=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float()

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (or an incomplete character)."""
    if text.endswith("\ufffd"):
        return len(text)  # wait for the rest of a multi-byte character
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class Decoder:
    """Runs batches of prompts through a LlavaModel. `decode(ids)` turns ids into text."""

    def __init__(self, model, decode: Callable[[list[int]], str], eos_ids: set[int], pad_id: int, stop_strings: Sequence[str] = (), fast: bool = True,
                 compile_step: bool = False) -> None:
        self.model = model
        self.fast = fast  # the lean Llama-family forward; False forces transformers' own
        # small models' decode steps compiled ahead of time per batch and cache length (`compiled_step`)
        self.compile_step = compile_step
        self.decode = decode
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id
        self.stop_strings = tuple(stop_strings)

    @torch.inference_mode()
    def decode_steps(
        self,
        prompts: Sequence[list[int]],
        pixel_values: Sequence[torch.Tensor | None],
        params: Sequence[SamplingParams],
        cancelled: Callable[[int], bool] | None = None,
        stream: bool = True,
    ) -> Iterator[StepEvent]:
        """Text deltas of every row as tokens come. With `stream=False` a row without stop
        strings yields one event, when it finishes (nothing reads its text before)."""
        model = self.model
        lm = model.language_model
        device = model.device
        rows = []
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            gen = None
            if sp.temperature > 0:
                gen = torch.Generator(device=device)
                gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            rows.append(_Row(list(p), sp, tuple(dict.fromkeys((*self.stop_strings, *sp.stop))), gen))
            if not p:
                raise VituneError(f"prompt {i} is empty")

        # Prefill: left-pad, one forward over all prompts with their images.
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pixels = [pv for pv in pixel_values if pv is not None and pv.shape[0] > 0]
        features = model.encode_images(torch.cat(pixels)) if pixels else None
        embeds = model.embed(ids, image_features=features)
        max_len = width + max(r.params.max_new_tokens for r in rows)
        runner = FastLM(lm, len(rows), max_len, compiled=self.compile_step) if self.fast and supports(lm) else _HFRunner(lm)
        logits = runner.prefill(embeds, mask)
        live = list(range(len(rows)))  # batch position -> row index
        needs_history = any(r.params.repetition_penalty != 1.0 for r in rows)
        history = [torch.tensor(r.prompt, device=device) for r in rows] if needs_history else []
        greedy = all(r.params.temperature == 0 and r.params.repetition_penalty == 1.0 for r in rows)

        while True:
            if greedy:
                tokens = logits.argmax(-1)
            else:
                tokens = self._sample(logits, [rows[i] for i in live], [history[i] for i in live] if needs_history else [])
            keep: list[int] = []
            for b, (i, tok) in enumerate(zip(live, tokens.tolist(), strict=True)):
                r = rows[i]
                r.out.append(tok)
                if needs_history:
                    history[i] = torch.cat([history[i], tokens[b : b + 1]])
                event = self._advance(i, r, tok, stream)
                if r.finish is None and cancelled is not None and cancelled(i):
                    r.finish = "cancelled"
                    # A streamed row has had its text; an unstreamed one gets what it has so far.
                    rest = "" if stream or r.stops else self._final_text(r.out)
                    event = StepEvent(i, rest, "cancelled", list(r.out))
                if event is not None:
                    yield event
                if r.finish is None:
                    keep.append(b)
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                runner.select_rows(index)
                tokens = tokens[index]
                live = [live[b] for b in keep]
            logits = runner.step(tokens)

    def _final_text(self, ids: list[int]) -> str:
        return self.decode(ids).lstrip()

    def _detokenize(self, r: _Row) -> None:
        """Extend `r.raw` with the text of the newest tokens, decoded after a few earlier ones so
        that spacing and merges across the boundary come out as in a full decoding; an incomplete
        multi-byte character waits for the next token."""
        before = self.decode(r.out[r.prefix : r.read])
        after = self.decode(r.out[r.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return
        if after.startswith(before):
            r.raw += after[len(before) :]
        else:  # the tokenizer rewrote earlier text (clean-up rules): take the full decoding
            r.raw = self.decode(r.out)
        r.prefix, r.read = r.read, len(r.out)

    def _advance(self, i: int, r: _Row, tok: int, stream: bool = True) -> StepEvent | None:
        """Update a row's text after one token; return what it can stream now."""
        if tok in self.eos_ids:
            r.finish = "stop"
        elif len(r.out) >= r.params.max_new_tokens:
            r.finish = "length"
        if r.finish is None and not stream and not r.stops:
            return None  # no one reads this row's text before it finishes
        if r.finish is not None:
            text = self._final_text(r.out[:-1] if r.finish == "stop" else r.out)
        else:
            self._detokenize(r)
            text = r.raw.lstrip()
        for s in r.stops:
            cut = text.find(s, max(0, r.emitted - len(s)))
            if cut >= 0:
                text = text[:cut]
                r.finish = "stop"
        r.text = text
        if r.finish is not None:
            delta = text[r.emitted :]
            r.emitted = len(text)
            return StepEvent(i, delta, r.finish, list(r.out))
        upto = len(text) - _hold_back(text, r.stops)
        if upto > r.emitted:
            delta = text[r.emitted : upto]
            r.emitted = upto
            return StepEvent(i, delta)
        return None

    def _sample(self, logits: torch.Tensor, rows: list[_Row], history: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for b, r in enumerate(rows):
            row = logits[b]
            sp = r.params
            if sp.repetition_penalty != 1.0:
                seen = history[b].unique()
                seen = seen[seen < row.shape[0]]
                vals = row[seen]
                row = row.clone()
                row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
            if sp.temperature == 0:
                out[b] = row.argmax()
                continue
            row = row / sp.temperature
            if sp.top_k > 0:
                kth = torch.topk(row, min(sp.top_k, row.shape[0])).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if sp.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = sorted_logits.softmax(-1)
                # drop a token when the mass before it already reaches top_p (always keep the first)
                drop = probs.cumsum(-1) - probs >= sp.top_p
                row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            out[b] = torch.multinomial(row.softmax(-1), 1, generator=r.generator)[0]
        return out

    def generate(
        self,
        prompts: Sequence[list[int]],
        pixel_values: Sequence[torch.Tensor | None],
        params: Sequence[SamplingParams],
        on_event: Callable[[StepEvent], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[GenerationOutput]:
        texts = [""] * len(prompts)
        outs: list[list[int]] = [[] for _ in prompts]
        finish: list[str] = ["length"] * len(prompts)
        for event in self.decode_steps(prompts, pixel_values, params, cancelled, stream=on_event is not None):
            texts[event.row] += event.text
            if event.finish_reason is not None:
                finish[event.row] = event.finish_reason
                outs[event.row] = event.output_ids or []
            if on_event is not None:
                on_event(event)
        return [GenerationOutput(text=texts[i].rstrip(), prompt_ids=list(prompts[i]), output_ids=outs[i], finish_reason=finish[i]) for i in range(len(prompts))]
