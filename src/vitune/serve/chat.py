"""Terminal chat with a model: `vitune chat --model DIR [--image PATH]`.

`ChatSession` holds one conversation (turns, the images attached to them, sampling parameters)
and streams each answer from `Pipeline.stream`. `run_chat` is the read-eval loop over any text
streams: interactive on a terminal (prompts, `/help`), or piped, reading one question per line and
writing each answer on its own line. Commands: `/image PATH` (the next question is about this
image), `/reset`, `/save FILE` (the conversation as a LLaVA training record), `/help`, `/quit`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from vitune.errors import VituneError
from vitune.images import DEFAULT_MAX_PIXELS, load_image
from vitune.inference import GenerationRequest, SamplingParams
from vitune.io import atomic_write_json
from vitune.templates import IMAGE_MARKER

HELP = """commands:
  /image PATH   use this image from the next question on (the conversation keeps earlier images)
  /reset        forget the conversation (the current image is asked about again next)
  /save FILE    write the conversation as JSON (a LLaVA-format record)
  /help         this list
  /quit         leave (or Ctrl-D)
anything else is a question; answers stream as they are generated."""


@dataclasses.dataclass
class Turn:
    question: str
    image: str | None = None  # path of the image first shown with this question
    answer: str | None = None


class ChatSession:
    """One multi-turn conversation with a loaded `Pipeline`."""

    def __init__(self, pipe: Any, params: SamplingParams, system: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.pipe = pipe
        self.params = params
        self.system = system
        self.max_image_pixels = max_image_pixels
        self.turns: list[Turn] = []
        self.images: dict[str, Image.Image] = {}  # path -> decoded image, for every image in the turns
        self.pending_image: str | None = None  # set by /image, attached to the next question

    def set_image(self, path: str) -> None:
        """Load now (so a bad path fails at once, naming it); attach to the next question."""
        path = str(Path(path).expanduser())
        self.images[path] = load_image(path, max_pixels=self.max_image_pixels, where=path)
        self.pending_image = path

    def reset(self) -> None:
        last = next((t.image for t in reversed(self.turns) if t.image), None)
        self.pending_image = self.pending_image or last
        self.turns = []
        self.images = {k: v for k, v in self.images.items() if k == self.pending_image}

    def messages(self, turns: list[Turn] | None = None) -> tuple[list[dict[str, str]], list[Image.Image]]:
        messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        images: list[Image.Image] = []
        for turn in self.turns if turns is None else turns:
            text = turn.question
            if turn.image is not None:
                images.append(self.images[turn.image])
                text = f"{IMAGE_MARKER}\n{text}"
            messages.append({"role": "user", "content": text})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": turn.answer})
        return messages, images

    def ask(self, question: str) -> Iterator[str]:
        """Stream the answer to `question`; the turn is kept only once the answer is complete."""
        if IMAGE_MARKER in question:
            raise VituneError(f"the question contains {IMAGE_MARKER}; use /image PATH to add an image")
        turn = Turn(question, self.pending_image)
        messages, images = self.messages([*self.turns, turn])
        request = GenerationRequest(messages, images, self.params)
        ids, pixels = self.pipe.prepare(request)
        room = self.pipe.context_length - len(ids)
        if room < 1:
            raise VituneError(f"the conversation is {len(ids)} tokens, longer than the model's context of "
                              f"{self.pipe.context_length}; /reset to start over")
        params = dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, room))
        pieces: list[str] = []
        for event in self.pipe.decoder.decode_steps([ids], [pixels], [params]):
            if event.text:
                pieces.append(event.text)
                yield event.text
        turn.answer = "".join(pieces).strip()
        self.turns.append(turn)
        self.pending_image = None

    def record(self) -> dict[str, Any]:
        """The conversation as a LLaVA record (`image` is a path, or a list when there are several)."""
        conversations = []
        if self.system:
            conversations.append({"from": "system", "value": self.system})
        paths: list[str] = []
        for turn in self.turns:
            value = turn.question
            if turn.image is not None:
                paths.append(turn.image)
                value = f"{IMAGE_MARKER}\n{value}"
            conversations.append({"from": "human", "value": value})
            conversations.append({"from": "gpt", "value": turn.answer or ""})
        record: dict[str, Any] = {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}", "conversations": conversations,
                                  "sampling": dataclasses.asdict(self.params)}
        if paths:
            record["image"] = paths[0] if len(paths) == 1 else paths
        return record

    def save(self, path: str) -> Path:
        out = Path(path).expanduser()
        if out.parent and not out.parent.exists():
            raise VituneError(f"{out}: the folder {out.parent} does not exist")
        atomic_write_json(out, self.record())
        return out


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> int:
    """The chat loop. Returns 0, or 1 when a piped session hit an error (a bad path, a failed save)."""
    failed = False
    answering = False
    if interactive:
        stdout.write("vitune chat: type a question, /help for commands, Ctrl-D to leave.\n")
        if session.pending_image:
            stdout.write(f"image: {session.pending_image}\n")
    while True:
        if interactive and stdin is sys.stdin and stdout is sys.stdout:
            try:
                line = input("USER: ") + "\n"  # input() gives line editing and history on a terminal
            except EOFError:
                line = ""
        else:
            if interactive:
                stdout.write("USER: ")
                stdout.flush()
            line = stdin.readline()
        if not line:
            if interactive:
                stdout.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                command, _, arg = line.partition(" ")
                arg = arg.strip()
                if command in ("/quit", "/exit"):
                    break
                if command == "/help":
                    stdout.write(HELP + "\n")
                elif command == "/reset":
                    session.reset()
                    if interactive:
                        stdout.write("(conversation cleared)\n")
                elif command == "/image":
                    if not arg:
                        raise VituneError("/image needs a path: /image PATH")
                    session.set_image(arg)
                    if interactive:
                        stdout.write(f"(image {arg} loaded; ask about it)\n")
                elif command == "/save":
                    if not arg:
                        raise VituneError("/save needs a file name: /save FILE")
                    out = session.save(arg)
                    if interactive:
                        stdout.write(f"(saved {len(session.turns)} turns to {out})\n")
                else:
                    raise VituneError(f"unknown command {command}; /help lists the commands")
                continue
            if interactive:
                stdout.write("ASSISTANT: ")
            started = False
            answering = True
            pending = ""  # trailing whitespace waits: the printed answer is exactly the kept one
            for piece in session.ask(line):
                text = pending + piece
                if not started:
                    text = text.lstrip()
                    started = bool(text)
                shown = text.rstrip()
                pending = text[len(shown):]
                stdout.write(shown)
                stdout.flush()
            stdout.write("\n")
            stdout.flush()
            answering = False
        except VituneError as err:
            if answering:
                stdout.write("\n")
                answering = False
            stdout.flush()
            stderr.write(f"error: {err}\n")
            stderr.flush()
            failed = True
    return 1 if failed and not interactive else 0
