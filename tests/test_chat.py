"""Terminal chat: the session (multi-turn, images, reset, save), the command loop, and `vitune chat`
with piped stdin in a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vitune.errors import VituneError
from vitune.inference import GenerationRequest, Pipeline, SamplingParams
from vitune.serve.chat import ChatSession, run_chat

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 30), (200, 10, 10)).save(path)
    return path


def reference(pipe: Pipeline, messages: list[dict[str, str]], images: list[Image.Image]) -> str:
    return pipe.generate([GenerationRequest(messages, images, GREEDY)])[0].text


def test_multi_turn_streams_and_keeps_history(pipe: Pipeline, image_path: Path) -> None:
    session = ChatSession(pipe, GREEDY)
    session.set_image(str(image_path))
    pieces = list(session.ask("what color is the circle?"))
    assert len(pieces) > 1, "the answer should stream in pieces"
    first = "".join(pieces).strip()
    image = Image.open(image_path).convert("RGB")
    assert first == reference(pipe, [{"role": "user", "content": "<image>\nwhat color is the circle?"}], [image])
    second = "".join(session.ask("how many objects are there?")).strip()
    messages, images = session.messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == first and messages[0]["content"].startswith("<image>\n")
    assert "<image>" not in messages[2]["content"], "the image goes with the turn it was given for, once"
    assert len(images) == 1
    # the second answer saw the whole conversation, image included
    assert second == reference(pipe, messages[:3], [image])


def test_image_command_attaches_to_next_question_and_reset(pipe: Pipeline, image_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "blue.png"
    Image.new("RGB", (16, 16), (0, 0, 255)).save(other)
    session = ChatSession(pipe, GREEDY)
    list(session.ask("yes or no?"))  # text only
    session.set_image(str(other))
    list(session.ask("what color is the circle?"))
    messages, images = session.messages()
    assert "<image>" not in messages[0]["content"] and messages[2]["content"].startswith("<image>\n")
    assert len(images) == 1 and images[0].getpixel((0, 0)) == (0, 0, 255)
    session.reset()
    assert session.turns == [] and session.pending_image == str(other)
    list(session.ask("describe the image in detail."))
    assert session.messages()[0][0]["content"].startswith("<image>\n"), "after /reset the current image is asked about again"
    with pytest.raises(VituneError, match="missing.png"):
        session.set_image(str(tmp_path / "missing.png"))
    with pytest.raises(VituneError, match="/image"):
        list(session.ask("what is in <image>?"))


def test_save_writes_a_llava_record_the_processor_accepts(pipe: Pipeline, image_path: Path, tmp_path: Path) -> None:
    session = ChatSession(pipe, GREEDY, system="You are terse.")
    session.set_image(str(image_path))
    list(session.ask("what color is the circle?"))
    list(session.ask("how many objects are there?"))
    out = session.save(str(tmp_path / "chat.json"))
    record = json.loads(out.read_text())
    assert record["image"] == str(image_path)
    assert [t["from"] for t in record["conversations"]] == ["system", "human", "gpt", "human", "gpt"]
    assert record["conversations"][2]["value"] == session.turns[0].answer
    enc = pipe.processor.encode(record["conversations"], num_images=1, where="saved chat")
    assert any(label != -100 for label in enc.labels), "the answers are supervised when trained on"
    with pytest.raises(VituneError, match="does not exist"):
        session.save(str(tmp_path / "no" / "such" / "dir.json"))


def test_run_chat_piped_one_question_per_line(pipe: Pipeline, image_path: Path, tmp_path: Path) -> None:
    saved = tmp_path / "conv.json"
    stdin = io.StringIO(f"/image {image_path}\nwhat color is the circle?\n\n/help\nhow many objects are there?\n/save {saved}\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    rc = run_chat(ChatSession(pipe, GREEDY), stdin, stdout, stderr, interactive=False)
    assert rc == 0, stderr.getvalue()
    record = json.loads(saved.read_text())
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    out = stdout.getvalue()
    assert out.startswith(answers[0])
    assert answers[1] in out and "/image PATH" in out  # /help printed its list
    # errors go to stderr and make the piped run fail, but the loop goes on
    stdin = io.StringIO(f"/image {tmp_path}/nope.png\n/bogus\nyes or no?\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    rc = run_chat(ChatSession(pipe, GREEDY), stdin, stdout, stderr, interactive=False)
    assert rc == 1
    assert "nope.png" in stderr.getvalue() and "unknown command /bogus" in stderr.getvalue()
    assert stdout.getvalue().strip(), "the question after the errors was still answered"


def test_run_chat_interactive_prompts_and_reset(pipe: Pipeline) -> None:
    stdin = io.StringIO("yes or no?\n/reset\n/quit\nnever asked\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    session = ChatSession(pipe, GREEDY)
    assert run_chat(session, stdin, stdout, stderr, interactive=True) == 0
    out = stdout.getvalue()
    assert "USER: ASSISTANT: " in out and "(conversation cleared)" in out
    assert session.turns == []


def test_vitune_chat_subprocess_with_piped_stdin(tiny_model_dir: Path, image_path: Path, pipe: Pipeline) -> None:
    questions = "what color is the circle?\nhow many objects are there?\n"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vitune.cli", "chat", "--model", str(tiny_model_dir), "--image", str(image_path),
         "--temperature", "0", "--max-new-tokens", "10"],
        input=questions, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    session = ChatSession(pipe, GREEDY)
    session.set_image(str(image_path))
    expected = ["".join(session.ask(q)).strip() for q in questions.splitlines()]
    assert proc.stdout == "".join(a + "\n" for a in expected)


def test_chat_command_refuses_a_non_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitune.cli import main

    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "not a vitune model directory" in capsys.readouterr().err
