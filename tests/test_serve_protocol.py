"""Request validation of the OpenAI wire format, without a model: every bad input is a 4xx APIError
naming the field, never another exception."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitune.serve.protocol import APIError, Limits, parse_chat_request, parse_json_body

LIMITS = Limits(max_images=3, max_image_pixels=100_000, max_new_tokens=100)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def body(content: Any = "hi", **kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def rejects(b: dict[str, Any], match: str, status: int = 400) -> APIError:
    with pytest.raises(APIError) as info:
        parse_chat_request(b, LIMITS)
    assert info.value.status == status
    assert match in info.value.message, info.value.message
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}
    return info.value


def test_parts_become_markers_and_images_decode_in_order() -> None:
    red, blue = Image.new("RGB", (4, 6), (255, 0, 0)), Image.new("RGBA", (5, 5), (0, 0, 255, 128))
    req = parse_chat_request({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(red)}}, {"type": "text", "text": "a?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "b?"}, {"type": "image_url", "image_url": data_url(blue, "WEBP")}]},
    ], "max_completion_tokens": 7, "stop": "###", "seed": 3, "temperature": 0.5, "stream": True,
        "stream_options": {"include_usage": True}}, LIMITS)
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1]["content"][0] == {"type": "image"}
    assert [im.size for im in req.images] == [(4, 6), (5, 5)] and all(im.mode == "RGB" for im in req.images)
    assert req.params.max_new_tokens == 7 and req.params.stop == ("###",) and req.params.seed == 3
    assert req.stream and req.include_usage and req.max_tokens_given


def test_defaults_and_greedy_top_p_zero() -> None:
    req = parse_chat_request(body(), LIMITS)
    assert req.params.max_new_tokens == LIMITS.max_new_tokens and not req.max_tokens_given
    assert req.params.temperature == 1.0  # OpenAI's default
    assert parse_chat_request(body(top_p=0), LIMITS).params.temperature == 0.0


@pytest.mark.parametrize(("b", "match"), [
    (body(n=2), "n=1"),
    (body(logprobs=True), "logprobs"),
    ({"messages": []}, "non-empty"),
    ({"messages": "hi"}, "non-empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}, {"role": "user", "content": "c"}]}, "only accepted in user"),
    (body(temperature=float("nan")), "temperature"),
    (body(temperature="hot"), "temperature"),
    (body(top_p=1.5), "top_p"),
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens=2.5), "max_tokens"),
    (body(max_tokens=101), "at most 100"),
    (body(stop=["a", "b", "c", "d", "e"]), "at most 4"),
    (body(stop=[""]), "empty"),
    (body(stop=7), "stop"),
    (body(stream="yes"), "stream"),
    (body(stream_options=[1]), "stream_options"),
    (body("\ud800 lone surrogate"), "not valid Unicode"),
    (body([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]), "base64"),
    (body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]), "not valid base64"),
    (body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]), "empty"),
    (body([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]), "never reads its own files"),
    (body([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), "never reads its own files"),
    (body([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]), "--allow-remote-images"),
    (body([{"type": "image_url", "image_url": {}}]), "url must be"),
])
def test_rejections_name_the_field(b: dict[str, Any], match: str) -> None:
    rejects(b, match)


def test_image_limits() -> None:
    small = {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (2, 2)))}}
    err = rejects(body([small] * 4), "at most 3")
    assert err.code == "too_many_images"
    # a decompression bomb: tiny file, huge canvas; refused from the header, before decoding
    bomb = data_url(Image.new("L", (2000, 2000)))
    assert len(bomb) < 20_000
    err = rejects(body([{"type": "image_url", "image_url": {"url": bomb}}]), "over the limit")
    assert err.param == "messages[0].content[0].image_url"
    junk = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 50).decode()
    rejects(body([{"type": "image_url", "image_url": {"url": junk}}]), "image")


def test_json_body_errors() -> None:
    for raw, match in ((b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"\xff\xfe\x00", "not valid JSON"),
                       (b"[" * 100_000, "not valid JSON")):
        with pytest.raises(APIError, match=match) as info:
            parse_json_body(raw)
        assert info.value.status == 400


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "other"])},
                              optional={"text": _json, "image_url": _json | st.fixed_dictionaries({"url": st.text(max_size=30)})})
_message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool"]) | _json,
                                               "content": st.text(max_size=30) | st.lists(_part, max_size=3) | _json})
_body = st.fixed_dictionaries({}, optional={
    "messages": st.lists(_message, max_size=4) | _json, "max_tokens": _json, "temperature": _json, "top_p": _json,
    "stop": _json, "seed": _json, "stream": _json, "stream_options": _json, "n": _json, "model": _json, "top_k": _json,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_body)
def test_fuzzed_bodies_are_accepted_or_refused_with_4xx(b: dict[str, Any]) -> None:
    try:
        req = parse_chat_request(json.loads(json.dumps(b)), LIMITS)
    except APIError as err:
        assert 400 <= err.status < 500
    else:
        assert req.messages and req.messages[-1]["role"] == "user"
