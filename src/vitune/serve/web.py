"""The web demo at `/`: a Gradio page mounted into the API server's FastAPI app.

The layout follows the original LLaVA demo: the image and the sampling controls (temperature,
top-p, max new tokens) on the left, the chat on the right with Send, Regenerate and Clear. Answers
stream token by token. The page does not load a second model: its handlers prepare prompts with
the server's processor and queue them on the same `Batcher` as the API, so web users and API
clients share one batch. With `--api-key`, the page asks for the key (any user name) first.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from PIL import Image

from vitune.errors import VituneError
from vitune.generation import SamplingParams, StepEvent
from vitune.images import load_image
from vitune.serve.protocol import APIError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vitune.serve.app import Server

IMAGE_MARKER = "<image>"

Turn = dict[str, Any]  # {"user": str, "image": PIL.Image | None, "assistant": str}


def image_key(image: Image.Image | None) -> str | None:
    """A content hash: Gradio hands us a new PIL object per event, the same picture must match."""
    if image is None:
        return None
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


def conversation(turns: list[Turn]) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """Model messages and images for the turns so far; each image goes with the turn it was new in."""
    messages: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for turn in turns:
        text = turn["user"]
        if turn.get("image") is not None:
            images.append(turn["image"])
            text = f"{IMAGE_MARKER}\n{text}"
        messages.append({"role": "user", "content": text})
        if turn.get("assistant") is not None:
            messages.append({"role": "assistant", "content": turn["assistant"]})
    return messages, images


def chat_display(turns: list[Turn]) -> list[dict[str, str]]:
    shown: list[dict[str, str]] = []
    for turn in turns:
        shown.append({"role": "user", "content": ("[image] " if turn.get("image") is not None else "") + turn["user"]})
        if turn.get("assistant") is not None:
            shown.append({"role": "assistant", "content": turn["assistant"]})
    return shown


class WebChat:
    """The demo's handlers, independent of Gradio so they can be tested directly."""

    def __init__(self, server: Server, poll_s: float = 0.25) -> None:
        self.server = server
        self.poll_s = poll_s

    def stream_answer(self, turns: list[Turn], params: SamplingParams) -> Iterator[str]:
        """The growing answer to the last turn, as it is generated."""
        messages, images = conversation(turns)
        ids, pixels, params = self.server.encode(messages, images, params)
        events: queue.Queue = queue.Queue()
        job = self.server.submit_job(ids, pixels, params, events.put)
        text = ""
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise VituneError(f"generation failed: {event}")
                assert isinstance(event, StepEvent)
                text += event.text
                if event.finish_reason is not None:
                    yield text.rstrip()
                    return
                if event.text:
                    yield text
        finally:
            job.cancel()  # the page was closed or the user pressed Clear: stop the row

    def check_image(self, image: Image.Image | None) -> Image.Image | None:
        if image is None:
            return None
        return load_image(image, max_pixels=self.server.config.limits.max_image_pixels, where="uploaded image")

    def new_turn(self, turns: list[Turn], text: str, image: Image.Image | None, attached: str | None) -> tuple[list[Turn], str | None]:
        """Append a user turn; the image goes with it if it differs from the last one sent."""
        key = image_key(image)
        turn: Turn = {"user": text, "image": None, "assistant": None}
        if image is not None and key != attached:
            turn["image"] = self.check_image(image)
            attached = key
        return [*turns, turn], attached


def _params(temperature: float, top_p: float, max_tokens: float) -> SamplingParams:
    return SamplingParams(max_new_tokens=max(1, int(max_tokens)), temperature=float(temperature), top_p=max(float(top_p), 1e-3))


def build_demo(server: Server) -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    web = WebChat(server)
    limit = min(server.config.limits.max_new_tokens, server.context_length)

    def fail(err: Exception) -> Exception:
        message = err.message if isinstance(err, APIError) else str(err)
        return gr.Error(message)

    def run(turns: list[Turn], temperature: float, top_p: float, max_tokens: float) -> Iterator[tuple[Any, list[Turn]]]:
        try:
            for text in web.stream_answer(turns, _params(temperature, top_p, max_tokens)):
                turns[-1]["assistant"] = text
                yield chat_display(turns), turns
        except (APIError, VituneError) as err:
            turns.pop()
            raise fail(err) from None

    def send(text: str, image: Image.Image | None, temperature: float, top_p: float, max_tokens: float,
             turns: list[Turn], attached: str | None) -> Iterator[tuple[Any, list[Turn], str, str | None]]:
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a question first.")
        try:
            turns, attached = web.new_turn(list(turns or []), text, image, attached)
        except VituneError as err:
            raise fail(err) from None
        yield chat_display(turns), turns, "", attached
        for shown, turns in run(turns, temperature, top_p, max_tokens):
            yield shown, turns, "", attached

    def regenerate(temperature: float, top_p: float, max_tokens: float, turns: list[Turn]) -> Iterator[tuple[Any, list[Turn]]]:
        if not turns:
            raise gr.Error("Nothing to regenerate yet.")
        turns = [*turns[:-1], {**turns[-1], "assistant": None}]
        yield chat_display(turns), turns
        yield from run(turns, temperature, top_p, max_tokens)

    def clear() -> tuple[list, list, None, str, None]:
        return [], [], None, "", None

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title=f"vitune: {server.config.model_name}") as demo:
        gr.Markdown(f"## vitune &middot; {server.config.model_name}\nUpload an image, then ask about it. "
                    "The same model answers the OpenAI-compatible API at `/v1/chat/completions`.")
        turns_state = gr.State([])
        attached_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="image", sources=["upload", "clipboard"], height=280)
                temperature = gr.Slider(0.0, 2.0, value=0.2, step=0.05, label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.05, label="Top-p", elem_id="top_p")
                max_tokens = gr.Slider(1, limit, value=min(512, limit), step=1, label="Max new tokens", elem_id="max_tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=460, feedback_options=None, buttons=["copy", "copy_all"])
                question = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False, elem_id="question", lines=1)
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                    clear_btn = gr.Button("Clear", elem_id="clear")

        send_inputs = [question, image, temperature, top_p, max_tokens, turns_state, attached_state]
        send_outputs = [chatbot, turns_state, question, attached_state]
        send_event = send_btn.click(send, send_inputs, send_outputs, api_visibility="private")
        submit_event = question.submit(send, send_inputs, send_outputs, api_visibility="private")
        regen_event = regen_btn.click(regenerate, [temperature, top_p, max_tokens, turns_state], [chatbot, turns_state], api_visibility="private")
        clear_outputs = [chatbot, turns_state, image, question, attached_state]
        running = [send_event, submit_event, regen_event]
        clear_btn.click(clear, None, clear_outputs, cancels=running, api_visibility="private")
        chatbot.clear(clear, None, clear_outputs, cancels=running, api_visibility="private")  # the chat's own trash icon
    demo.queue(default_concurrency_limit=server.config.max_batch_size * 2, max_size=server.config.max_queue)
    demo.vitune_theme = theme  # type: ignore[attr-defined]
    return demo


def mount_web_demo(app: FastAPI, server: Server, path: str = "/") -> FastAPI:
    import gradio as gr

    demo = build_demo(server)
    key = server.config.api_key
    auth = (lambda _user, password: hmac.compare_digest(str(password).encode(), key.encode())) if key else None
    return gr.mount_gradio_app(
        app, demo, path=path, auth=auth, auth_message="Enter this server's API key as the password (any user name)." if key else None,
        ssr_mode=False, footer_links=[], max_file_size=server.config.limits.max_request_bytes, theme=demo.vitune_theme,
        show_error=True,
    )
