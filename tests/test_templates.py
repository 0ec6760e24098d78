"""Chat templates: ids and labels built together; one masking test per template, plus a property test."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitune.errors import VituneError
from vitune.model.build import prepare_tokenizer
from vitune.templates import IGNORE_INDEX, TEMPLATES, encode_conversation, get_template, normalize_conversation

IMAGE_ID = 10_000  # outside the tiny vocabulary, so placeholders are easy to find
N_IMG = 3

THREE_TURNS = [
    {"from": "human", "value": "<image>\nwhat color is the circle?"},
    {"from": "gpt", "value": "the circle is red."},
    {"from": "human", "value": "how many objects are there?"},
    {"from": "gpt", "value": "there are three objects."},
    {"from": "human", "value": "is it on the left?"},
    {"from": "gpt", "value": "yes"},
]
ANSWERS = ["the circle is red.", "there are three objects.", "yes"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(tiny_backbones: tuple[Path, Path]) -> dict:
    from transformers import AutoTokenizer

    out = {}
    for name in TEMPLATES:
        tok = AutoTokenizer.from_pretrained(str(tiny_backbones[1]))
        tok.chat_template = CHAT_TEMPLATE
        out[name] = prepare_tokenizer(tok, name)
    return out


def supervised_spans(labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            cur.append(label)
    if cur:
        spans.append(cur)
    return spans


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "plain"])
def test_masking_three_turns(name: str, tokenizers: dict) -> None:
    tok = tokenizers[name]
    template = get_template(name)
    enc = encode_conversation(template, normalize_conversation(THREE_TURNS), tok, IMAGE_ID, N_IMG)
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.num_images == 1
    # image placeholders: present, contiguous, unsupervised
    positions = [i for i, t in enumerate(enc.input_ids) if t == IMAGE_ID]
    assert len(positions) == N_IMG and positions == list(range(positions[0], positions[0] + N_IMG))
    assert all(enc.labels[i] == IGNORE_INDEX for i in positions)
    # labels equal ids where supervised
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids))
    # exactly three supervised spans: each answer and its end-of-turn marker, nothing of the user turns
    spans = supervised_spans(enc.labels)
    assert len(spans) == 3
    ends = template.end_strings(tok)
    for span, answer in zip(spans, ANSWERS):
        text = tok.decode(span, skip_special_tokens=False).strip()
        assert text.startswith(answer), (name, text)
        assert any(text.endswith(e) for e in ends), (name, text, ends)
    unsupervised = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX and t != IMAGE_ID])
    assert "what color is the circle?" in unsupervised and "how many objects" in unsupervised
    assert "the circle is red" not in unsupervised


def test_plain_is_image_then_caption(tokenizers: dict) -> None:
    tok = tokenizers["plain"]
    conv = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "a red circle"}]
    enc = encode_conversation(get_template("plain"), normalize_conversation(conv), tok, IMAGE_ID, N_IMG)
    # bos, the image, then the supervised caption + "\n": the instruction text is dropped
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids[1 : 1 + N_IMG] == [IMAGE_ID] * N_IMG
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: 1 + N_IMG])
    assert tok.decode(enc.input_ids[1 + N_IMG :]).strip() == "a red circle"
    assert enc.labels[1 + N_IMG :] == enc.input_ids[1 + N_IMG :]


def test_generation_prompt_ends_with_assistant_header(tokenizers: dict) -> None:
    tok = tokenizers["vicuna_v1"]
    msgs = normalize_conversation([{"role": "user", "content": "hello"}])
    enc = encode_conversation(get_template("vicuna_v1"), msgs, tok, IMAGE_ID, N_IMG, add_generation_prompt=True)
    assert tok.decode(enc.input_ids).rstrip().endswith("ASSISTANT:")
    assert all(lab == IGNORE_INDEX for lab in enc.labels)


def test_openai_messages_with_parts_equal_llava_form(tokenizers: dict) -> None:
    tok = tokenizers["vicuna_v1"]
    openai_form = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "what color is the circle?"}]},
        {"role": "assistant", "content": "the circle is red."},
    ]
    llava_form = THREE_TURNS[:2]
    t = get_template("vicuna_v1")
    a = encode_conversation(t, normalize_conversation(openai_form), tok, IMAGE_ID, N_IMG)
    b = encode_conversation(t, normalize_conversation(llava_form), tok, IMAGE_ID, N_IMG)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


@pytest.mark.parametrize(
    "conv, message",
    [
        ([{"from": "gpt", "value": "hi"}], "expected user"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "expected assistant"),
        ([{"from": "robot", "value": "a"}], "unknown from"),
        ([{"value": "a"}], "neither"),
        ([{"role": "user", "content": 3}], "content must be"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    ],
)
def test_bad_conversations_name_the_problem(conv: list, message: str) -> None:
    with pytest.raises(VituneError, match=message):
        normalize_conversation(conv, where="record 7")
    with pytest.raises(VituneError, match="record 7"):
        normalize_conversation(conv, where="record 7")


def test_unknown_template_lists_names() -> None:
    with pytest.raises(VituneError, match="vicuna_v1"):
        get_template("vicuna")


WORDS = st.sampled_from("the a red blue circle square left right how many is there yes no one two three color".split())
TEXT = st.lists(WORDS, min_size=1, max_size=8).map(" ".join)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 4))
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    for i in range(turns):
        q = draw(TEXT)
        if i == 0 and draw(st.booleans()):
            q = "<image>\n" + q
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": draw(TEXT)})
    return msgs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations(), name=st.sampled_from([n for n in TEMPLATES if n not in ("plain", "hf")]))
def test_supervised_tokens_decode_to_answers_and_end_tokens(conv: list, name: str, tokenizers: dict) -> None:
    tok = tokenizers[name]
    template = get_template(name)
    enc = encode_conversation(template, normalize_conversation(conv), tok, IMAGE_ID, N_IMG)
    spans = supervised_spans(enc.labels)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    end = template.assistant_end.format(bos=tok.bos_token, eos=tok.eos_token)
    for span, answer in zip(spans, answers):
        assert tok.decode(span, skip_special_tokens=False).strip() == (template.answer_prefix + answer + end).strip()
    assert sum(1 for t in enc.input_ids if t == IMAGE_ID) == N_IMG * sum(m["content"].count("<image>") for m in conv)
