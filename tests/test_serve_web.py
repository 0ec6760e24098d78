"""The web demo at `/`: its handlers directly, and the real page in headless Chromium (playwright)
against a live server on 127.0.0.1: upload an image, ask, watch the answer stream, regenerate,
ask again, clear. Needs Debian's chromium (`apt-get install -y chromium`; `make test` does it)."""

from __future__ import annotations

import shutil
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from vitune.errors import VituneError
from vitune.inference import GenerationRequest, Pipeline, SamplingParams
from vitune.serve.app import ServeConfig, create_app
from vitune.serve.live import live_server
from vitune.serve.protocol import Limits
from vitune.serve.web import WebChat, conversation

# Gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning", "ignore:The copy keyword is deprecated:Warning")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


class SlowDecoder:
    """The real decoder with a pause per text delta, so a browser can see an answer grow."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def decode_steps(self, prompts, pixel_values, params, cancelled=None):  # noqa: ANN001, ANN201
        for event in self.inner.decode_steps(prompts, pixel_values, params, cancelled):
            time.sleep(self.delay_s)
            yield event


def greedy(pipe: Pipeline, messages: list[dict[str, str]], images: list[Image.Image], n: int) -> str:
    return pipe.generate([GenerationRequest(messages, images, SamplingParams(max_new_tokens=n))])[0].text


def test_web_chat_attaches_each_image_once(pipe: Pipeline) -> None:
    app = create_app(pipe, ServeConfig("tiny", limits=Limits(max_image_pixels=10_000), web=False))
    web = WebChat(app.state.server)
    red = Image.new("RGB", (20, 30), (200, 10, 10))
    turns, attached = web.new_turn([], "what color is the circle?", red, None)
    turns[-1]["assistant"] = "red"
    same = Image.new("RGB", (20, 30), (200, 10, 10))  # Gradio hands over a new object each time
    turns, attached = web.new_turn(turns, "how many objects are there?", same, attached)
    assert turns[1]["image"] is None
    turns[-1]["assistant"] = "one"
    turns, attached = web.new_turn(turns, "and now?", Image.new("RGB", (8, 8), (0, 0, 255)), attached)
    messages, images = conversation(turns)
    assert [m["content"].startswith("<image>\n") for m in messages] == [True, False, False, False, True]
    assert len(images) == 2
    with pytest.raises(VituneError, match="over the limit"):
        web.new_turn([], "big?", Image.new("RGB", (200, 200)), None)
    # the streamed answer is the model's own greedy answer (the batcher normally starts with the app)
    app.state.server.batcher.start()
    try:
        pieces = list(web.stream_answer([{**turns[0], "assistant": None}], SamplingParams(max_new_tokens=12)))
    finally:
        app.state.server.batcher.stop()
    assert len(pieces) > 1
    assert pieces[-1] == greedy(pipe, [{"role": "user", "content": "<image>\nwhat color is the circle?"}], [red], 12)


@pytest.fixture(scope="module")
def web_server(pipe: Pipeline) -> Iterator[tuple[str, Any]]:
    slow = types.SimpleNamespace(processor=pipe.processor, decoder=SlowDecoder(pipe.decoder, 0.04), context_length=pipe.context_length)
    app = create_app(slow, ServeConfig("tiny-web", limits=Limits(max_new_tokens=64)))
    with live_server(app) as url:
        yield url, app.state.server


def _browser() -> Any:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("Debian's chromium is not installed: run `apt-get install -y chromium` (make test installs it); "
                    "the web demo must be checked in a real browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: `pip install -e '.[dev]'` (never `playwright install`; we use Debian's chromium)")
    return sync_playwright


def test_web_demo_in_headless_chromium(web_server: tuple[str, Any], pipe: Pipeline, tmp_path: Path) -> None:
    sync_playwright = _browser()
    url, srv = web_server
    image_path = tmp_path / "red.png"
    Image.new("RGB", (20, 30), (200, 10, 10)).save(image_path)
    image = Image.open(image_path).convert("RGB")
    q1, q2, n = "what color is the circle?", "how many objects are there?", 24
    first = greedy(pipe, [{"role": "user", "content": f"<image>\n{q1}"}], [image], n)
    second = greedy(pipe, [{"role": "user", "content": f"<image>\n{q1}"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": q2}], [image], n)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_selector("#question textarea", timeout=30_000)
            page.set_input_files("#image input[type=file]", str(image_path))
            page.wait_for_selector("#image img", timeout=15_000)
            for slider, value in (("#temperature", "0"), ("#max_tokens", str(n))):
                box = page.locator(f"{slider} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.fill("#question textarea", q1)
            page.click("#send")

            bots = page.locator("#chatbot [data-testid=bot]")
            seen: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                texts = bots.all_inner_texts()
                if texts and (not seen or texts[-1] != seen[-1]):
                    seen.append(texts[-1])
                if texts and texts[-1].strip() == first:
                    break
                time.sleep(0.03)
            assert seen and seen[-1].strip() == first, f"the page never showed the model's answer; saw {seen[-3:]}"
            partial = [s for s in seen[:-1] if s.strip()]
            assert partial and all(first.startswith(s.strip()) for s in partial), "the answer should grow in place while it streams"
            assert page.locator("#chatbot [data-testid=user]").all_inner_texts()[0].endswith(q1)
            page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
            assert (tmp_path / "web_demo.png").stat().st_size > 10_000

            # wait for the regenerated answer's job to finish, not just start: the page still shows the old
            # answer while the new one begins, and a question sent then would read a half-streamed turn
            done = srv.batcher.stats.jobs_done
            page.click("#regenerate")
            _wait(lambda: srv.batcher.stats.jobs_done > done and [t.strip() for t in bots.all_inner_texts()] == [first])

            page.fill("#question textarea", q2)
            page.press("#question textarea", "Enter")
            _wait(lambda: [t.strip() for t in bots.all_inner_texts()] == [first, second])

            page.click("#clear")
            _wait(lambda: bots.count() == 0 and page.locator("#image img").count() == 0)
        finally:
            browser.close()


def _wait(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.05)


def test_web_demo_asks_for_the_api_key(pipe: Pipeline) -> None:
    app = create_app(pipe, ServeConfig("tiny", api_key="sk-web"))
    with live_server(app) as url, httpx.Client() as client:
        assert client.get(url + "/config").status_code == 401
        assert client.post(url + "/login", data={"username": "me", "password": "nope"}).status_code == 400
        assert client.post(url + "/login", data={"username": "me", "password": "sk-web"}).status_code == 200
        assert client.get(url + "/config").status_code == 200
        assert client.get(url + "/health").status_code == 200
