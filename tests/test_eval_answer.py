"""Phase 1: the answer log (resume after a kill, shards, merge), answering through an
OpenAI-compatible endpoint (the real `openai` client against a local server), and a real tiny
vitune model."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, server_error

from vitune.cli import main
from vitune.errors import VituneError
from vitune.eval.answer import (
    Answer,
    EndpointAnswerer,
    EvalItem,
    PipelineAnswerer,
    load_answer_texts,
    merge_answers,
    openai_messages,
    parse_shard,
    run_answers,
    shard_items,
)
from vitune.eval.io import read_jsonl

SQA = Path(__file__).parent / "fixtures" / "eval" / "scienceqa"
LB = Path(__file__).parent / "fixtures" / "eval" / "llava_bench"


class EchoAnswerer:
    """Answers 'A:<question_id>' and records every question it was asked."""

    name = "echo"

    def __init__(self, chunk_size: int = 3) -> None:
        self.chunk_size = chunk_size
        self.asked: list[str] = []

    def answer(self, items: Sequence[EvalItem]) -> list[Answer]:
        self.asked += [str(i.question_id) for i in items]
        return [Answer(f"A:{i.question_id}") for i in items]


def _items(n: int) -> list[EvalItem]:
    return [EvalItem(f"q{i}", f"question {i}?", fields={"category": "conv", "gold": str(i)}) for i in range(n)]


def test_answer_lines_and_resume_after_kill(tmp_path: Path) -> None:
    out = tmp_path / "answers.jsonl"
    items = _items(10)
    first = EchoAnswerer()
    run = run_answers(items[:7], first, out, progress=False)  # "killed" after 7 questions
    assert run.written == 7
    with out.open("a") as f:  # ... in the middle of writing the 8th line
        f.write('{"question_id": "q7", "prompt": "question 7?", "te')
    second = EchoAnswerer()
    run = run_answers(items, second, out, progress=False)
    assert second.asked == ["q7", "q8", "q9"]  # answered ids are skipped; the torn line is redone
    assert (run.skipped, run.written) == (7, 3)
    lines = read_jsonl(out)
    assert [r["question_id"] for r in lines] == [f"q{i}" for i in range(10)]
    assert lines[3] == {"question_id": "q3", "prompt": "question 3?", "text": "A:q3", "model_id": "echo",
                        "category": "conv", "gold": "3"}  # fmt: skip
    third = EchoAnswerer()
    assert run_answers(items, third, out, progress=False).written == 0 and third.asked == []


@pytest.mark.parametrize("n", [1, 7, 10])
def test_shards_partition_and_merge(tmp_path: Path, n: int) -> None:
    items = _items(n)
    paths = []
    for i in range(3):
        path = tmp_path / f"answers.{i}.jsonl"
        run_answers(items, EchoAnswerer(), path, shard=(i, 3), progress=False)
        paths.append(path)
    per_shard = [[r["question_id"] for r in read_jsonl(p)] if p.exists() else [] for p in paths]
    assert sorted(q for shard in per_shard for q in shard) == sorted(str(i.question_id) for i in items)  # disjoint, complete
    assert max(map(len, per_shard)) - min(map(len, per_shard)) <= 1  # balanced
    merged = tmp_path / "merged.jsonl"
    written, dups = merge_answers([*paths, paths[0]], merged)
    assert (written, dups) == (n, len(per_shard[0]))
    assert set(load_answer_texts(merged)) == {str(i.question_id) for i in items}


def test_shard_spec_and_item_checks() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(VituneError, match="shard"):
            parse_shard(bad)
    assert shard_items(_items(5), (0, 1)) == _items(5)
    with pytest.raises(VituneError, match="1 <image> marker"):
        EvalItem("x", "<image>\nWhat?", images=())
    with pytest.raises(VituneError, match="may not be named"):
        EvalItem("x", "What?", fields={"text": "leak"})
    with pytest.raises(VituneError, match="more than once"):
        run_answers([*_items(2), *_items(1)], EchoAnswerer(), Path("/nonexistent/never-written.jsonl"))


def test_openai_messages_interleave_images() -> None:
    img = LB / "images" / "001.png"
    item = EvalItem("x", "Compare <image> and <image>\nWhich is red?", images=(img, img))
    content = openai_messages(item)[-1]["content"]
    assert [p["type"] for p in content] == ["text", "image_url", "text", "image_url", "text"]
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == img.read_bytes()
    assert openai_messages(EvalItem("y", "Text only?"))[-1]["content"] == "Text only?"


def test_endpoint_answering(tmp_path: Path) -> None:
    def reply(body: dict) -> str:
        content = body["messages"][-1]["content"]
        images = [p for p in content if p["type"] == "image_url"] if isinstance(content, list) else []
        text = " ".join(p["text"] for p in content if p["type"] == "text") if isinstance(content, list) else content
        return f"{len(images)} image(s): {text.splitlines()[-1]}"

    out = tmp_path / "answers.jsonl"
    with FakeOpenAI(reply=reply) as server:
        server.enqueue(server_error(500))  # the client retries it
        argv = ["eval", "answer", "llava-bench", "--questions", str(LB / "questions.jsonl"), "--images",
                str(LB / "images"), "--endpoint", server.base_url, "--model", "other-vlm", "--out", str(out),
                "--api-key-env", "NO_SUCH_VAR", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        assert server.request_count == 7
        assert server.requests[-1].body["model"] == "other-vlm" and server.requests[-1].body["temperature"] == 0.0
        assert main(argv) == 0 and server.request_count == 7  # resumed: nothing left to ask
    lines = {r["question_id"]: r for r in read_jsonl(out)}
    assert set(lines) == set(range(6))
    assert lines[0]["text"] == "1 image(s): What color is the ball?"
    assert lines[0]["category"] == "conv" and lines[0]["prompt"] == "<image>\nWhat color is the ball?"
    assert lines[0]["model_id"] == "other-vlm"


def test_endpoint_failures_are_retried_on_rerun(tmp_path: Path) -> None:
    items = [EvalItem(f"q{i}", f"question {i}") for i in range(4)]
    out = tmp_path / "a.jsonl"
    with FakeOpenAI(reply=lambda body: "fine") as server:
        server.enqueue(*[server_error(503)] * 2)
        answerer = EndpointAnswerer(server.base_url, "m", "key", concurrency=1, max_retries=0)
        run = run_answers(items, answerer, out, progress=False)
        assert (run.written, len(run.failed)) == (2, 2)
        run = run_answers(items, answerer, out, progress=False)
        assert (run.skipped, run.written, run.failed) == (2, 2, [])
    assert sorted(load_answer_texts(out)) == ["q0", "q1", "q2", "q3"]


def test_scienceqa_items_from_cli_args(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    with FakeOpenAI(reply=lambda body: "B") as server:
        assert main(["eval", "answer", "scienceqa", "--data", str(SQA), "--format", "CQM-A", "--single-pred-prompt",
                     "--endpoint", server.base_url, "--model", "m", "--out", str(out), "--shard", "1/2",
                     "--api-key-env", "NO_SUCH_VAR", "--quiet"]) == 0  # fmt: skip
        bodies = [r.body for r in server.requests]
    lines = read_jsonl(out)
    assert [r["question_id"] for r in lines] == ["105", "106", "107", "108"]  # second half of the test split
    with_image = [b for b in bodies if isinstance(b["messages"][-1]["content"], list)]
    assert len(with_image) == 2  # 107 and 108 have images
    assert lines[0]["prompt"].endswith("Answer with the option's letter from the given choices directly.")
    assert lines[0]["answer"] == "E" and lines[0]["subject"] == "social science"


def test_tiny_model_answers_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from vitune.inference import SamplingParams

    img = LB / "images" / "001.png"
    items = [EvalItem(f"q{i}", f"<image>\nWhat is shown {i}?", images=(img,)) for i in range(3)]
    items.append(EvalItem("t", "A text-only question?"))
    params = SamplingParams(max_new_tokens=4)
    answerer = PipelineAnswerer.from_model_dir(tiny_model_dir, params, batch_size=2, device="cpu")
    out = tmp_path / "a.jsonl"
    run = run_answers(items, answerer, out, progress=False)
    assert run.written == 4 and not run.failed
    lines = read_jsonl(out)
    assert all(isinstance(r["text"], str) and r["metadata"]["finish_reason"] in ("stop", "length") for r in lines)
    # greedy decoding is deterministic: answering one question again gives the same text
    again = PipelineAnswerer.from_model_dir(tiny_model_dir, params, batch_size=1, device="cpu").answer(items[:1])
    assert again[0].text == lines[0]["text"]
    assert run_answers(items, answerer, out, progress=False).written == 0
    with pytest.raises(VituneError, match="not a model directory"):
        PipelineAnswerer.from_model_dir(tmp_path / "nope", params)
    json.dumps(lines)  # the log is plain JSON
