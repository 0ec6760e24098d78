"""LLaVA-Bench: review parsing, the relative-score arithmetic, judge runs, file formats, and the
judge / reference commands through the data-generation engine against a real HTTP server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from vitune.cli import main
from vitune.errors import VituneError
from vitune.eval.io import read_jsonl
from vitune.eval.llava_bench import (
    CATEGORIES,
    JudgeInput,
    judge_messages,
    load_contexts,
    load_questions,
    parse_review,
    relative_score,
    score_reviews,
)

LB = Path(__file__).parent / "fixtures" / "eval" / "llava_bench"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8 9", (8, 9)),
        ("8 9\nAssistant 2 is more detailed.", (8, 9)),
        ("8, 9", (8, 9)),
        ("8/10 9/10", (8, 9)),
        ("8 out of 10, 9 out of 10", (8, 9)),
        ("(8, 9)\nbecause", (8, 9)),
        ("7.5 8", (7.5, 8)),
        ("\n\n  6 4", (6, 4)),
        ("Assistant 1: 8 ... Assistant 2: 9", (8, 9)),
        ("Assistant 1: 8\nGood.\nAssistant 2: 9\nBetter.", (8, 9)),
        ("Assistant 1 score: 7/10, Assistant 2 score: 6/10", (7, 6)),
        ("Assistant 1 receives a score of 7 and Assistant 2 receives an overall score of 5.", (7, 5)),
        ("Assistant 1: **8**  Assistant 2: **6**", (8, 6)),
        ("Scores: 3 10", (3, 10)),
        ("8", None),
        ("8 9 10", None),
        ("11 9", None),
        ("Both answers are fine.", None),
        ("Assistant 1 provides 3 examples.\n8 9", None),  # three numbers on the first line: ambiguous
        ("", None),
    ],
)
def test_parse_review_table(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_review(text) == expected


def test_score_fixture_reviews_by_hand() -> None:
    # conv (8,6) (9,7); detail (8,4) (7,7); complex (10,5) + one unparsed. The stale `score`
    # fields in the file are ignored: scores are re-parsed from `text`.
    result = score_reviews(read_jsonl(LB / "reviews.jsonl"))
    cats = result["categories"]
    assert set(cats) == {"conv", "detail", "complex", "all"}
    assert cats["conv"] == {"reference": 8.5, "model": 6.5, "relative": round(100 * 6.5 / 8.5, 2), "n": 2}
    assert cats["detail"] == {"reference": 7.5, "model": 5.5, "relative": round(100 * 5.5 / 7.5, 2), "n": 2}
    assert cats["complex"] == {"reference": 10.0, "model": 5.0, "relative": 50.0, "n": 1}
    assert cats["all"]["n"] == 5 and cats["all"]["reference"] == 8.4 and cats["all"]["model"] == 5.8
    assert cats["all"]["relative"] == round(100 * 5.8 / 8.4, 2)
    assert result["unparsed"] == 1


def test_judge_runs_mean_and_std() -> None:
    def review(qid: int, cat: str, ref: int, model: int, run: int) -> dict:
        return {"question_id": qid, "category": cat, "text": f"{ref} {model}", "run": run}

    reviews = [review(0, "conv", 10, 8, 0), review(1, "detail", 10, 6, 0), review(2, "complex", 10, 10, 0),
               review(0, "conv", 10, 6, 1), review(1, "detail", 10, 6, 1), review(2, "complex", 8, 8, 1)]  # fmt: skip
    result = score_reviews(reviews)
    assert result["judge_runs"] == 2 and len(result["runs"]) == 2
    conv = result["categories"]["conv"]
    assert conv["relative"] == 70.0 and conv["relative_std"] == pytest.approx(14.1421, abs=1e-3)  # 80, 60
    assert result["categories"]["detail"]["relative_std"] == 0.0
    # "all" per run: run 0 = 24/30 = 80%, run 1 = 20/28 = 71.43%
    assert result["categories"]["all"]["relative"] == pytest.approx((80 + 100 * 20 / 28) / 2, abs=0.01)


def test_relative_score() -> None:
    assert relative_score([8, 10], [6, 9]) == pytest.approx(100 * 7.5 / 9)
    with pytest.raises(VituneError):
        relative_score([0, 0], [1, 1])


def test_files_and_judge_prompt() -> None:
    questions = load_questions(LB / "questions.jsonl")
    assert [q.category for q in questions] == ["conv", "conv", "detail", "detail", "complex", "complex"]
    contexts = load_contexts(LB / "context.jsonl")
    coco_like = contexts["001.png"]
    assert "A red ball lies on the grass." in coco_like
    assert "sports ball: [0.310, 0.400, 0.520, 0.610]" in coco_like
    assert contexts["002"].startswith("A blue bowl of fruit")
    prompts = set()
    for cat in CATEGORIES:
        item = JudgeInput(0, cat, "CTX", "QUESTION?", "REFERENCE", "MODEL ANSWER")
        messages = judge_messages(item)
        user = messages[-1]["content"]
        assert user.index("REFERENCE") < user.index("MODEL ANSWER")  # reference is Assistant 1
        assert "[Assistant 1]\nREFERENCE" in user and "[Assistant 2]\nMODEL ANSWER" in user and "CTX" in user
        prompts.add(user.split("[System]")[1])
    assert len(prompts) == 3  # one prompt per category


def test_bad_question_file(tmp_path: Path) -> None:
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "x", "category": "chat"}) + "\n")
    with pytest.raises(VituneError, match=r"record 1: category 'chat'"):
        load_questions(bad)


def _judge_reply(body: dict) -> str:
    # A judge that reads the two answers from the prompt: longer answer, higher score.
    user = body["messages"][-1]["content"]
    a1 = re.search(r"\[Assistant 1\]\n(.*?)\n\n\[End of Assistant 1\]", user, re.DOTALL).group(1)  # type: ignore[union-attr]
    a2 = re.search(r"\[Assistant 2\]\n(.*?)\n\n\[End of Assistant 2\]", user, re.DOTALL).group(1)  # type: ignore[union-attr]
    if "Eat." in a2:
        return "I refuse to rate this."
    return f"{min(10, 2 + len(a1) // 10)} {min(10, 2 + len(a2) // 10)}\nlonger is better here"


def test_judge_and_score_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reviews = tmp_path / "reviews.jsonl"
    with FakeOpenAI(reply=_judge_reply) as server:
        argv = ["eval", "judge", "llava-bench", "--questions", str(LB / "questions.jsonl"),
                "--contexts", str(LB / "context.jsonl"), "--references", str(LB / "answers_reference.jsonl"),
                "--answers", str(LB / "answers_model.jsonl"), "--out", str(reviews), "--judge-runs", "2",
                "--base-url", server.base_url, "--model", "judge-model", "--api-key-env", "NO_SUCH_VAR"]  # fmt: skip
        assert main(argv) == 0
        assert server.request_count == 12  # 6 questions x 2 runs
        sent = server.requests[0].body
        assert sent["model"] == "judge-model" and sent["temperature"] == 0.2
        assert main(argv) == 0
        assert server.request_count == 12  # the rerun is served from the cache
    lines = read_jsonl(reviews)
    assert len(lines) == 12 and {r["run"] for r in lines} == {0, 1}
    assert all({"question_id", "category", "text", "score"} <= set(r) for r in lines)
    unparsed = [r for r in lines if r["score"] is None]
    assert {r["question_id"] for r in unparsed} == {5}  # "Eat." -> the judge refused
    out = tmp_path / "r.json"
    assert main(["eval", "score", "llava-bench", "--reviews", str(reviews), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["unparsed"] == 2 and result["judge_runs"] == 2
    for cat in ("conv", "detail", "complex", "all"):
        assert set(result["categories"][cat]) >= {"reference", "model", "relative", "n"}
    assert result["categories"]["complex"]["n"] == 1
    # the model's answers are all shorter than the references, so they score lower
    assert 0 < result["categories"]["all"]["relative"] < 100
    assert "relative" in capsys.readouterr().out


def test_reference_command_sees_context_not_image(tmp_path: Path) -> None:
    out = tmp_path / "refs.jsonl"
    with FakeOpenAI(reply=lambda body: "A reference answer.") as server:
        assert main(["eval", "reference", "--questions", str(LB / "questions.jsonl"), "--contexts",
                     str(LB / "context.jsonl"), "--out", str(out), "--base-url", server.base_url,
                     "--model", "teacher", "--api-key-env", "NO_SUCH_VAR"]) == 0  # fmt: skip
        bodies = [r.body for r in server.requests]
    refs = read_jsonl(out)
    assert [r["question_id"] for r in refs] == [0, 1, 2, 3, 4, 5]
    assert all(r["text"] == "A reference answer." for r in refs)
    assert len(bodies) == 6
    assert all(isinstance(m["content"], str) for b in bodies for m in b["messages"])  # text only: no image parts
    # requests run concurrently, so question 0's is found by its question, not by arrival order
    first = [b["messages"] for b in bodies if "What color is the ball?" in b["messages"][-1]["content"]]
    assert len(first) == 1 and "A red ball lies on the grass." in first[0][-1]["content"]


def test_judge_reports_failures(tmp_path: Path) -> None:
    from fake_openai import client_error

    with FakeOpenAI(reply=lambda body: client_error(400, "bad request")) as server:
        code = main(["eval", "judge", "llava-bench", "--questions", str(LB / "questions.jsonl"),
                     "--contexts", str(LB / "context.jsonl"), "--references", str(LB / "answers_reference.jsonl"),
                     "--answers", str(LB / "answers_model.jsonl"), "--out", str(tmp_path / "rv.jsonl"),
                     "--base-url", server.base_url, "--model", "m", "--api-key-env", "NO_SUCH_VAR"])  # fmt: skip
    assert code == 1
    lines = read_jsonl(tmp_path / "rv.jsonl")
    assert all(r["score"] is None and r["error"] for r in lines)
