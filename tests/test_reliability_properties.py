"""Property-based checks (hypothesis) of the pieces every sample and every reply goes through:
image-token expansion, the feature splice into the embeddings, template rendering and masking on
arbitrary text, and the parsers that read judge reviews, ScienceQA answers and teacher replies.
Parsers must never crash on any text and must read back every well-formed reply they are given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vitune.errors import VituneError
from vitune.templates import IGNORE_INDEX, IMAGE_MARKER, TEMPLATES, encode_conversation, get_template, normalize_conversation

FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir: Path):
    from vitune.model.llava import LlavaModel
    from vitune.processor import LlavaProcessor

    return LlavaModel.from_pretrained(tiny_model_dir), LlavaProcessor.from_pretrained(tiny_model_dir)


# -- image-token expansion -------------------------------------------------------------------------
WORDS = st.sampled_from("the a red blue circle square left right how many is there yes no one two three color "
                        "<imag image> <image <img> < > ### USER: ASSISTANT: </s> \n \t 12 . , ? ! é 中 🙂".split(" "))
TEXT = st.lists(WORDS, min_size=1, max_size=10).map(" ".join).filter(lambda s: s.strip() != "")


@st.composite
def conversations_with_images(draw: st.DrawFn) -> tuple[list[dict], int]:
    """LLaVA conversations with 0-3 `<image>` markers anywhere in the user turns."""
    turns = draw(st.integers(1, 3))
    conv: list[dict] = []
    images = 0
    for _ in range(turns):
        pieces = [draw(TEXT)]
        for _ in range(draw(st.integers(0, 2 if images < 2 else 0))):
            pieces.insert(draw(st.integers(0, len(pieces))), IMAGE_MARKER)
            images += 1
        conv.append({"from": "human", "value": draw(st.sampled_from([" ", "\n", ""])).join(pieces)})
        conv.append({"from": "gpt", "value": draw(TEXT)})
    return conv, images


def placeholder_runs(ids: list[int], token: int) -> list[int]:
    runs, cur = [], 0
    for t in ids:
        if t == token:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    return runs + ([cur] if cur else [])


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=conversations_with_images())
def test_each_image_marker_expands_to_one_run_of_placeholders(data: tuple[list[dict], int], model_and_processor) -> None:
    conv, n_images = data
    _, processor = model_and_processor
    cfg = processor.config
    enc = processor.encode(conv, num_images=n_images, where="record 5")
    assert enc.num_images == n_images
    assert len(enc.input_ids) == len(enc.labels)
    # markers that touch each other would merge into one run; count tokens, and runs when separated
    assert enc.input_ids.count(cfg.image_token_id) == n_images * cfg.num_image_tokens
    runs = placeholder_runs(enc.input_ids, cfg.image_token_id)
    assert all(r % cfg.num_image_tokens == 0 for r in runs)
    assert all(lab == IGNORE_INDEX for t, lab in zip(enc.input_ids, enc.labels, strict=True) if t == cfg.image_token_id)
    # a wrong image count is refused with the caller's record name
    with pytest.raises(VituneError, match="record 5"):
        processor.encode(conv, num_images=n_images + 1, where="record 5")


# -- the feature splice ----------------------------------------------------------------------------
@st.composite
def batches(draw: st.DrawFn, vocab: int, image_token: int, n_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Rows of random text ids with 0-3 placeholder runs at random places; images per row."""
    rows, counts = [], []
    for _ in range(draw(st.integers(1, 4))):
        text = draw(st.lists(st.integers(0, vocab - 1).filter(lambda t: t != image_token), min_size=1, max_size=12))
        k = draw(st.integers(0, 3))
        ids = list(text)
        for _ in range(k):
            at = draw(st.integers(0, len(ids)))
            ids[at:at] = [image_token] * n_tokens
        rows.append(ids)
        counts.append(k)
    return rows, counts


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_embed_places_projected_features_in_order(data: st.DataObject, model_and_processor) -> None:
    model, _ = model_and_processor
    cfg = model.config
    emb = model.language_model.get_input_embeddings()
    rows, counts = data.draw(batches(emb.num_embeddings, cfg.image_token_id, cfg.num_image_tokens))
    width = max(len(r) for r in rows)
    pad = 0 if cfg.image_token_id != 0 else 1
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    n_images = sum(counts)
    torch.manual_seed(len(rows) * 7 + n_images)
    feats = torch.randn(n_images, cfg.num_image_tokens, model.text_hidden_size)
    with torch.no_grad():
        out = model.embed(ids, image_features=feats)
        table = emb(ids)
    assert out.shape == (len(rows), width, model.text_hidden_size)
    mask = ids == cfg.image_token_id
    # placeholders hold exactly the features, image after image in row-major order ...
    assert torch.equal(out[mask], feats.reshape(-1, model.text_hidden_size))
    # ... and every other position is the token's own embedding
    assert torch.equal(out[~mask], table[~mask])
    # each image's run sits in its own row, in the order of the rows
    k = 0
    for b, r in enumerate(rows):
        for start in [i for i in range(len(r)) if r[i] == cfg.image_token_id and (i == 0 or r[i - 1] != cfg.image_token_id)]:
            # adjacent runs merge; walk them image by image
            i = start
            while i < len(r) and r[i] == cfg.image_token_id:
                assert torch.equal(out[b, i : i + cfg.num_image_tokens], feats[k])
                i += cfg.num_image_tokens
                k += 1
    assert k == n_images
    # one feature too many or too few fails loudly with both numbers
    wrong = torch.randn(n_images + 1, cfg.num_image_tokens, model.text_hidden_size)
    with pytest.raises(VituneError, match=f"{n_images * cfg.num_image_tokens} placeholder tokens"):
        model.embed(ids, image_features=wrong)


def test_embed_from_pixels_equals_embed_from_features(model_and_processor) -> None:
    from PIL import Image

    model, processor = model_and_processor
    ids, pixels = processor.encode_prompt([{"role": "user", "content": "<image> and <image>: which is red?"}],
                                          [Image.new("RGB", (9, 5), (200, 0, 0)), Image.new("RGB", (4, 12), (0, 0, 200))])
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        feats = model.encode_images(pixels)
        assert torch.equal(model.embed(ids_t, pixel_values=pixels), model.embed(ids_t, image_features=feats))


# -- template rendering and masking on arbitrary text ------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(tiny_backbones: tuple[Path, Path]) -> dict:
    from transformers import AutoTokenizer

    from vitune.model.build import prepare_tokenizer

    out = {}
    for name in TEMPLATES:
        if name == "hf":
            continue
        out[name] = prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_backbones[1])), name)
    return out


ANY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip() != "" and IMAGE_MARKER not in s)


@st.composite
def any_conversations(draw: st.DrawFn) -> list[dict]:
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(ANY_TEXT)})
    for i in range(draw(st.integers(1, 3))):
        q = draw(ANY_TEXT)
        if draw(st.booleans()):
            q = IMAGE_MARKER + "\n" + q if i == 0 else q + " " + IMAGE_MARKER
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": draw(ANY_TEXT)})
    return msgs


IMG, N_IMG = 10_000, 3


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(conv=any_conversations(), name=st.sampled_from([n for n in TEMPLATES if n != "hf"]))
def test_masking_invariants_hold_for_any_text(conv: list[dict], name: str, tokenizers: dict) -> None:
    tok = tokenizers[name]
    template = get_template(name)
    enc = encode_conversation(template, normalize_conversation(conv), tok, IMG, N_IMG)
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(enc.input_ids, enc.labels, strict=True))
    markers = sum(m["content"].count(IMAGE_MARKER) for m in conv if m["role"] == "user")
    assert enc.num_images == markers and enc.input_ids.count(IMG) == markers * N_IMG
    assert all(lab == IGNORE_INDEX for t, lab in zip(enc.input_ids, enc.labels, strict=True) if t == IMG)
    # supervised tokens are the answers' own tokens: each answer yields one nonempty span, and the
    # supervised ids are exactly the answers + end markers tokenized on their own
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    end = template.assistant_end.format(bos=tok.bos_token or "", eos=tok.eos_token or "")
    per_answer = [tok(template.answer_prefix + a + end, add_special_tokens=False)["input_ids"] for a in answers]
    assert [lab for lab in enc.labels if lab != IGNORE_INDEX] == [t for ids in per_answer for t in ids]
    # a generation prompt supervises only the earlier answers, never what the user wrote
    gen = encode_conversation(template, normalize_conversation(conv[:-1]), tok, IMG, N_IMG, add_generation_prompt=True)
    assert [lab for lab in gen.labels if lab != IGNORE_INDEX] == [t for ids in per_answer[:-1] for t in ids]


@settings(max_examples=40, deadline=None)
@given(text=ANY_TEXT)
def test_image_marker_in_an_answer_is_refused(text: str) -> None:
    class Tok:
        bos_token, eos_token = "<s>", "</s>"

        def __call__(self, s: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [ord(c) % 500 for c in s]}

    conv = normalize_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": text + IMAGE_MARKER}])
    with pytest.raises(VituneError, match="assistant answer"):
        encode_conversation(get_template("vicuna_v1"), conv, Tok(), IMG, N_IMG)


# -- parsers: never crash, read back what is well formed ---------------------------------------------
ARBITRARY = st.text(max_size=300) | st.text(st.sampled_from("Assistant 12:.,/ 10 out of The answer is ABCDE\n()*-"), max_size=200)


@settings(max_examples=400, deadline=None)
@given(ARBITRARY)
def test_review_parser_never_crashes(text: str) -> None:
    from vitune.eval.llava_bench import parse_review

    pair = parse_review(text)
    assert pair is None or (len(pair) == 2 and all(0 <= s <= 10 for s in pair))


SCORE = st.integers(0, 10) | st.integers(0, 100).map(lambda x: x / 10)


def fmt_score(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


@settings(max_examples=200, deadline=None)
@given(a=SCORE, b=SCORE, style=st.integers(0, 4), tail=st.text(max_size=80).filter(lambda s: "Assistant" not in s))
def test_review_parser_reads_well_formed_replies(a: float, b: float, style: int, tail: str) -> None:
    from vitune.eval.llava_bench import parse_review

    first = [f"{fmt_score(a)} {fmt_score(b)}", f"{fmt_score(a)}, {fmt_score(b)}", f"{fmt_score(a)}/10 {fmt_score(b)}/10",
             f"({fmt_score(a)}, {fmt_score(b)})", f"Assistant 1: {fmt_score(a)}\nAssistant 2: {fmt_score(b)}"][style]
    # the explanation after the scores line may hold any text, numbers included
    assert parse_review(f"{first}\n{tail}") == (a, b)


@settings(max_examples=400, deadline=None)
@given(ARBITRARY, st.integers(1, 5))
def test_answer_extractor_never_crashes(text: str, n: int) -> None:
    from vitune.eval.scienceqa import OPTIONS, extract_answer

    got = extract_answer(text, n)
    assert got is None or got in OPTIONS[:n]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 5), data=st.data())
def test_answer_extractor_reads_well_formed_replies(n: int, data: st.DataObject) -> None:
    from vitune.eval.scienceqa import OPTIONS, extract_answer

    letter = data.draw(st.sampled_from(OPTIONS[:n]))
    # (a bare "A." is unread, as by the official evaluator: "A. " must be followed by the explanation)
    lecture = data.draw(st.text(st.characters(exclude_characters="ABCDE."), max_size=60).filter(lambda s: s.strip() != ""))
    reply = data.draw(st.sampled_from([letter, f"{letter}. {lecture}", f"{lecture} The answer is {letter}.",
                                       f"  {letter}\n"]))
    assert extract_answer(reply, n) == letter
    # a letter beyond the problem's choices is unreadable, not wrong
    if n < 5:
        assert extract_answer(f"The answer is {OPTIONS[n]}.", n) is None


@settings(max_examples=300, deadline=None)
@given(ARBITRARY | st.none(), st.sampled_from(["conversation", "detail", "complex"]), st.sampled_from([None, "stop", "length"]))
def test_teacher_reply_parser_accepts_or_quarantines_with_a_known_reason(text: str | None, kind: str, finish: str | None) -> None:
    from vitune.datagen.parse import QUARANTINE_REASONS, ParseError, parse_response

    try:
        turns = parse_response(kind, text, finish)
    except ParseError as err:
        assert err.reason in QUARANTINE_REASONS and err.detail
        return
    assert finish != "length" and turns
    assert [t.role for t in turns] == (["gpt"] if kind == "detail" else ["human", "gpt"] * (len(turns) // 2))
    assert all(t.text.strip() for t in turns)


SENTENCE = st.lists(st.sampled_from("the shape red blue sits near far top corner small large two three is".split()),
                    min_size=2, max_size=9).map(lambda w: " ".join(w).capitalize() + ".")


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(SENTENCE, SENTENCE), min_size=1, max_size=4), sep=st.booleans(), inline=st.booleans())
def test_teacher_reply_parser_round_trips_well_formed_conversations(pairs: list[tuple[str, str]], sep: bool, inline: bool) -> None:
    from vitune.datagen.parse import parse_response

    lines = []
    for q, a in pairs:
        for label, body in (("Question", q), ("Answer", a)):
            lines += [f"{label}: {body}"] if inline else [f"{label}:", body]
            if sep:
                lines.append("===")
    turns = parse_response("conversation", "\n".join(lines), "stop")
    assert [(t.role, t.text) for t in turns] == [x for q, a in pairs for x in (("human", q), ("gpt", a))]
