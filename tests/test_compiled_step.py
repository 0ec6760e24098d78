"""The ahead-of-time compiled decode step: the eager step's numbers and tokens, one library per
shape cached on disk and shared by models of that shape, a fallback to the eager step."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from PIL import Image

from vitune.generation import Decoder, SamplingParams
from vitune.inference import GenerationRequest, Pipeline
from vitune.model import compiled_step
from vitune.model.fast_lm import FastLM


def requests() -> list[GenerationRequest]:
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (40, 20), (0, 0, 255))
    return [GenerationRequest([{"role": "user", "content": "<image>\nwhat color is it?"}], [red]),
            GenerationRequest([{"role": "user", "content": "<image>\nhow many objects are there on the left of the square?"}], [blue])]


@pytest.fixture()
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    # one directory for the module's tests, so the library compiled first is reused after
    root = tmp_path_factory.getbasetemp() / "aoti-cache"
    monkeypatch.setenv("VITUNE_CACHE_DIR", str(root))
    return root / "aoti"


def _decode(pipe: Pipeline, compile_step: bool, eos: set[int] = frozenset(), n: int = 10) -> list[list[int]]:
    prepared = [pipe.prepare(r) for r in requests()]  # two prompts of different lengths: a left-padded batch
    decoder = Decoder(pipe.model, pipe.processor.decode, set(eos), pipe.processor.tokenizer.pad_token_id, compile_step=compile_step)
    outs = decoder.generate([p[0] for p in prepared], [p[1] for p in prepared], [SamplingParams(max_new_tokens=n)] * 2)
    return [o.output_ids for o in outs]


def test_compiled_step_gives_the_eager_numbers_and_is_shared_by_shape(tiny_model_dir: Path, cache: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    eager = _decode(pipe, compile_step=False)
    assert _decode(pipe, compile_step=True) == eager
    assert len(list(cache.glob("*.pt2"))) == 1 and not list(cache.glob("*.tmp-*"))
    # step by step, the logits agree to fp32 rounding
    prepared = [pipe.prepare(r) for r in requests()]
    width = max(len(p[0]) for p in prepared)
    ids = torch.tensor([[0] * (width - len(p[0])) + p[0] for p in prepared])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(p[0])] for p in prepared])).long()
    pixels = torch.cat([p[1] for p in prepared if p[1] is not None])
    lm = pipe.model.language_model
    with torch.inference_mode():
        embeds = pipe.model.embed(ids, pixel_values=pixels)
        runs = [FastLM(lm, 2, width + 10), FastLM(lm, 2, width + 10, compiled=True)]
        logits = [r.prefill(embeds, mask) for r in runs]
        for _ in range(6):
            torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
            tokens = logits[0].argmax(-1)
            logits = [r.step(tokens) for r in runs]
    assert runs[1]._compiled_step is not None and runs[1].k[0].shape[2] == compiled_step.cache_length(width + 10)
    # Another model of the same shape (other weights): the same library, that model's own numbers.
    other = copy.deepcopy(pipe.model)
    with torch.no_grad():
        for p in other.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other_pipe = Pipeline(other, pipe.processor)
    assert _decode(other_pipe, compile_step=True) == _decode(other_pipe, compile_step=False) != eager
    assert len(list(cache.glob("*.pt2"))) == 1
    # The key covers the step's code: an edited step would not load the old library.
    fl = FastLM(pipe.model.language_model, 1, 70, compiled=True)
    args = compiled_step._inputs(fl, compiled_step.weights(fl))
    key = compiled_step._key(compiled_step.StepSpec.of(fl), args)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(compiled_step.inspect, "getsource", lambda f: f.__name__ + " edited")
        compiled_step._step_source.cache_clear()  # read once per process: a new process sees the edit
        assert compiled_step._key(compiled_step.StepSpec.of(fl), args) != key
    compiled_step._step_source.cache_clear()
    assert compiled_step._key(compiled_step.StepSpec.of(fl), args) == key


def test_compiled_step_falls_back_to_eager(tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    eager = _decode(pipe, compile_step=False)
    # A row that ends early shrinks the batch (another shape): the rest of it decodes eagerly.
    eos = {eager[0][3]}
    assert _decode(pipe, compile_step=True, eos=eos) == _decode(pipe, compile_step=False, eos=eos)

    def broken(fl: FastLM) -> None:
        raise RuntimeError("no C++ compiler")

    # A model whose layers are too large to fuse is not compiled: its cache keeps its exact length.
    from vitune.model import fast_lm

    with monkeypatch.context() as m:
        m.setattr(fast_lm, "FUSE_BYTES", 0)
        unfused = FastLM(pipe.model.language_model, 1, 70, compiled=True)
        assert not unfused.compiled and unfused.k[0].shape[2] == 70
        assert _decode(pipe, compile_step=True) == eager

    monkeypatch.setattr(compiled_step, "load_step", broken)
    with caplog.at_level(logging.WARNING):
        assert _decode(pipe, compile_step=True) == eager
    assert "no C++ compiler" in caplog.text and "decoding eagerly" in caplog.text
