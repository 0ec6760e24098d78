"""Our decoding loop: batched equals unbatched, stop rules, streaming, sampling, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitune.errors import VituneError
from vitune.generation import SamplingParams, _hold_back
from vitune.inference import GenerationRequest, Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


def requests(params: SamplingParams | None = None) -> list[GenerationRequest]:
    params = params or SamplingParams(max_new_tokens=10)
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (40, 20), (0, 0, 255))
    return [
        GenerationRequest([{"role": "user", "content": "<image>\nwhat color is it?"}], [red], params),
        GenerationRequest([{"role": "user", "content": "how many objects are there on the left of the square?"}], [], params),
        GenerationRequest([{"role": "user", "content": "<image> <image> compare them"}], [blue, red], params),
        GenerationRequest([{"role": "user", "content": "describe"}, {"role": "assistant", "content": "a red circle"}, {"role": "user", "content": "<image>\nand now?"}], [blue], params),
    ]


def reference_greedy(pipe: Pipeline, request: GenerationRequest, n: int) -> list[int]:
    """Greedy decoding with no cache at all: the full sequence through the model at every step."""
    ids, pixels = pipe.prepare(request)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = pipe.model(torch.tensor([ids + out]), pixel_values=pixels).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_kv_cache_decoding_equals_full_recompute(pipe: Pipeline) -> None:
    req = requests(SamplingParams(max_new_tokens=8))[0]
    assert pipe.generate([req])[0].output_ids == reference_greedy(pipe, req, 8)


def test_batched_greedy_equals_unbatched(pipe: Pipeline) -> None:
    reqs = requests()
    batched = pipe.generate(reqs, batch_size=4)
    single = [pipe.generate([r])[0] for r in reqs]
    assert [b.output_ids for b in batched] == [s.output_ids for s in single]
    assert [b.text for b in batched] == [s.text for s in single]
    assert all(len(b.output_ids) == 10 and b.finish_reason == "length" for b in batched)


def test_stream_concatenates_to_text(pipe: Pipeline) -> None:
    req = requests(SamplingParams(max_new_tokens=12))[0]
    pieces = list(pipe.stream(req))
    assert len(pieces) > 1
    assert "".join(pieces).rstrip() == pipe.generate([req])[0].text


def test_stop_string_ends_and_is_cut(pipe: Pipeline) -> None:
    req = requests(SamplingParams(max_new_tokens=12))[0]
    full = pipe.generate([req])[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    req.params = SamplingParams(max_new_tokens=12, stop=(stop,))
    cut = pipe.generate([req])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)].rstrip()
    assert "".join(pipe.stream(req)).rstrip() == cut.text


def test_eos_stops(pipe: Pipeline) -> None:
    """Declare the 4th greedy token an end token: the row stops there, and the text excludes it."""
    from vitune.generation import Decoder

    req = requests(SamplingParams(max_new_tokens=10))[0]
    full = pipe.generate([req])[0].output_ids
    end = full[3]
    k = full.index(end)
    dec = Decoder(pipe.model, pipe.processor.decode, {end}, pipe.processor.tokenizer.pad_token_id)
    ids, pixels = pipe.prepare(req)
    out = dec.generate([ids], [pixels], [req.params])[0]
    assert out.finish_reason == "stop"
    assert out.output_ids == full[: k + 1]
    assert out.text == pipe.processor.decode(full[:k]).strip()


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(pipe: Pipeline) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=7, repetition_penalty=1.1)
    a = pipe.generate(requests(params)[:1])[0].output_ids
    b = pipe.generate(requests(params)[:1])[0].output_ids
    greedy = pipe.generate(requests(SamplingParams(max_new_tokens=16))[:1])[0].output_ids
    assert a == b
    assert a != greedy
    params.seed = 8
    assert pipe.generate(requests(params)[:1])[0].output_ids != a


def test_top_k_one_is_greedy(pipe: Pipeline) -> None:
    greedy = pipe.generate(requests(SamplingParams(max_new_tokens=8))[:1])[0].output_ids
    k1 = pipe.generate(requests(SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=1))[:1])[0].output_ids
    assert k1 == greedy


def test_cancel_stops_one_row(pipe: Pipeline) -> None:
    reqs = requests(SamplingParams(max_new_tokens=10))[:2]
    ids = [pipe.prepare(r) for r in reqs]
    events = list(pipe.decoder.decode_steps([i for i, _ in ids], [p for _, p in ids], [r.params for r in reqs], cancelled=lambda row: row == 0))
    finals = {e.row: e for e in events if e.finish_reason}
    assert finals[0].finish_reason == "cancelled" and len(finals[0].output_ids) == 1
    assert finals[1].finish_reason == "length" and len(finals[1].output_ids) == 10


def test_hold_back_partial_stop_strings() -> None:
    assert _hold_back("hello #", ["###"]) == 1
    assert _hold_back("hello ##", ["###", "END"]) == 2
    assert _hold_back("hello", ["###"]) == 0
    assert _hold_back("caf\ufffd", []) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_sampling_params_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(VituneError, match=message):
        SamplingParams(**kwargs)


def test_cli_build_and_generate_json(tiny_backbones: tuple[Path, Path], tmp_path: Path) -> None:
    vision, llm = tiny_backbones
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "vitune.cli"]
    subprocess.run([*cmd, "build", "--vision", str(vision), "--llm", str(llm), "--projector", "mlp2x_gelu", "--out", str(out)], check=True, capture_output=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    img = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(img)
    res = subprocess.run([*cmd, "generate", "--model", str(out), "--image", str(img), "--prompt", "what color?", "--max-new-tokens", "6", "--json"],
                         check=True, capture_output=True, text=True)
    data = json.loads(res.stdout)
    assert set(data) >= {"prompt_ids", "output_ids", "text"}
    assert len(data["output_ids"]) <= 6 and len(data["prompt_ids"]) > 16
    pipe = Pipeline.from_pretrained(out)
    again = pipe.generate([GenerationRequest([{"role": "user", "content": "what color?"}], [Image.open(img)], SamplingParams(max_new_tokens=6))])[0]
    assert again.output_ids == data["output_ids"] and again.prompt_ids == data["prompt_ids"]
    bad = subprocess.run([*cmd, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no config.json" in bad.stderr


@pytest.mark.parametrize("llm, kernel", [("llama", "measured"), ("qwen2", "measured"), ("llama", "onednn"), ("llama", "unfused")])
def test_lean_forward_matches_transformers(tmp_path: Path, llm: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean Llama-family decode path gives transformers' numbers: same logits, same tokens,
    with whichever decode kernel this machine measured fastest, with oneDNN's forced, and with
    the separate projections of large models. The step after the prefill reads the keys and
    values its last layer cached (that layer runs the rest at the last position only)."""
    from vitune.generation import Decoder
    from vitune.model import fast_lm, kernels

    if kernel == "unfused":
        monkeypatch.setattr(fast_lm, "FUSE_BYTES", 0)
    if kernel == "onednn":
        monkeypatch.setattr(kernels, "_chosen", {})
        monkeypatch.setattr(kernels, "_choose", lambda *_: kernels._onednn)
    from vitune.model.build import build_llava
    from vitune.model.fast_lm import FastLM, supports
    from vitune.testing import make_tiny_backbones

    vdir, ldir = make_tiny_backbones(tmp_path, llm=llm)
    model, proc = build_llava(str(vdir), str(ldir), template="chatml")
    lm = model.language_model
    assert supports(lm)
    pipe = Pipeline(model, proc)
    reqs = requests(SamplingParams(max_new_tokens=12))
    prepared = [pipe.prepare(r) for r in reqs]
    ids = [p[0] for p in prepared]
    pixels = [p[1] for p in prepared]
    args = (pipe.processor.decode, set(), proc.tokenizer.pad_token_id)
    lean = Decoder(model, *args, fast=True).generate(ids, pixels, [r.params for r in reqs])
    ref = Decoder(model, *args, fast=False).generate(ids, pixels, [r.params for r in reqs])
    assert [o.output_ids for o in lean] == [o.output_ids for o in ref]
    # logits of the prefill and of one decode step, left-padded batch
    width = max(len(i) for i in ids)
    batch = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        embeds = model.embed(batch, pixel_values=torch.cat([p for p in pixels if p is not None]))
        fast = FastLM(lm, len(ids), width + 4)
        got = fast.prefill(embeds, mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        nxt = got.argmax(-1)
        got2 = fast.step(nxt)
        full = torch.cat([batch, nxt[:, None]], 1)
        want2 = lm(inputs_embeds=torch.cat([embeds, lm.get_input_embeddings()(nxt[:, None])], 1),
                   attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                   position_ids=torch.cat([positions, positions[:, -1:] + 1], 1)).logits[:, -1]
        assert full.shape[1] == width + 1
        torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)
