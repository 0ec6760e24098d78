"""ScienceQA: answer extraction, the official breakdown on hand-made problems, prompt formats,
the LLaVA conversion, and the judge ensemble (arithmetic, and through the engine on a fake server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from vitune.cli import main
from vitune.errors import VituneError
from vitune.eval.answer import load_answer_texts
from vitune.eval.ensemble import decide, run_ensemble
from vitune.eval.scienceqa import (
    CATEGORY_KEYS,
    SINGLE_PRED_SUFFIX,
    build_prompt,
    build_target,
    category_members,
    extract_answer,
    load_problems,
    load_split,
    score_scienceqa,
    to_llava,
)

SQA = Path(__file__).parent / "fixtures" / "eval" / "scienceqa"
ANSWERS = Path(__file__).parent / "fixtures" / "eval" / "scienceqa_answers.jsonl"


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("A", 4, "A"),
        ("  C\n", 4, "C"),
        ("B. Maine is north.", 4, "B"),
        ("Lecture text. The answer is D.", 4, "D"),
        ("Lecture. So the answer is A. The answer is A.", 4, "A"),  # matching is case-sensitive: one match
        ("The answer is A. The answer is A.", 4, None),  # exactly one match is required, as in LLaVA
        ("The answer is A. Then again, The answer is B.", 4, None),
        ("The answer is E.", 4, None),  # beyond the choices
        ("E", 5, "E"),
        ("I think it is B", 4, None),
        ("b", 4, None),
        ("(B)", 4, None),
        ("The answer is B", 4, None),  # no full stop: not the format
        ("", 4, None),
    ],
)
def test_extract_answer_table(text: str, n: int, expected: str | None) -> None:
    assert extract_answer(text, n) == expected


def test_score_matches_hand_computed_breakdown() -> None:
    # Fixture answers (gold letters in problems.json): 101 A ok, 102 "B. ..." ok, 103 wrong (B for A),
    # 104 two "The answer is" -> unparsed, 105 E ok, 106 "C" of 2 choices -> unparsed, 107 missing,
    # 108 free text -> unparsed. 3 of 8 right.
    result = score_scienceqa(load_split(SQA, "test"), load_answer_texts(ANSWERS))
    assert result["accuracy"] == 37.5 and result["correct"] == 3 and result["n"] == 8
    assert list(result["by_category"]) == list(CATEGORY_KEYS)
    assert result["by_category"] == {
        "NAT": 33.33,  # 101 ok, 104, 107
        "SOC": 66.67,  # 102 ok, 105 ok, 108
        "LAN": 0.0,  # 103, 106
        "TXT": 33.33,  # hints: 102 ok, 104, 106
        "IMG": 50.0,  # 101 ok, 102 ok, 107, 108
        "NO": 50.0,  # 103, 105 ok
        "G1-6": 50.0,  # 101 ok (4), 103 (2), 105 ok (6), 108 (5)
        "G7-12": 25.0,  # 102 ok (8), 104 (10), 106 (11), 107 (12)
    }
    assert sorted(result["unparsed"]) == ["104", "106", "108"]
    assert result["missing"] == ["107"]
    assert result["by_topic"]["physics"] == {"accuracy": 50.0, "n": 2}
    assert result["by_topic"]["grammar"] == {"accuracy": 0.0, "n": 1}


def test_text_and_image_problem_counts_under_both() -> None:
    problems = load_problems(SQA)
    assert set(category_members(problems["102"])) == {"SOC", "TXT", "IMG", "G7-12"}
    assert set(category_members(problems["103"])) == {"LAN", "NO", "G1-6"}


def test_prompt_formats() -> None:
    problems = load_problems(SQA)
    p = problems["102"]
    cqm = build_prompt(p, "CQM-A", single_pred_prompt=True)
    assert cqm == (
        "<image>\nContext: Figure: the United States.\nQuestion: Which of these states is farthest north?\n"
        "Options: (A) Arizona (B) Maine (C) Texas (D) Florida\n" + SINGLE_PRED_SUFFIX
    )
    qcm = build_prompt(problems["103"], "QCM-LEA")
    assert qcm.startswith("Which word would you find") and "\nContext: N/A\n" in qcm and "<image>" not in qcm
    assert build_target(p, "CQM-A") == "The answer is B."
    assert build_target(p, "CQM-A", single_pred_prompt=True) == "B"
    lea = build_target(problems["101"], "QCM-LEA")
    assert lea.startswith("Magnets can pull") and lea.endswith("The answer is A.")
    with pytest.raises(VituneError, match="unknown ScienceQA prompt format"):
        build_prompt(p, "QCM-ALE")


def test_to_llava_round_trip() -> None:
    records = to_llava(load_split(SQA, "train"), "QCM-LEA")
    assert [r["id"] for r in records] == ["201", "202"]
    with_image, text_only = records
    assert with_image["image"] == "201/image.png" and (SQA / "images" / "train" / with_image["image"]).is_file()
    assert "image" not in text_only and "<image>" not in text_only["conversations"][0]["value"]
    assert with_image["conversations"][0]["value"].count("<image>") == 1
    gold = load_problems(SQA)
    for r in records:
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
        assert extract_answer(r["conversations"][1]["value"], len(gold[r["id"]].choices)) == gold[r["id"]].answer_letter


def test_bad_release_is_named(tmp_path: Path) -> None:
    problems = json.loads((SQA / "problems.json").read_text())
    problems["101"]["answer"] = 7
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text((SQA / "pid_splits.json").read_text())
    with pytest.raises(VituneError, match=r"problem '101'.*'answer' 7"):
        load_problems(tmp_path)
    with pytest.raises(VituneError, match="no split 'dev'"):
        load_split(SQA, "dev")


def test_cli_score_and_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", "score", "scienceqa", "--data", str(SQA), "--answers", str(ANSWERS), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["accuracy"] == 37.5 and set(result["by_category"]) == set(CATEGORY_KEYS)
    assert "37.50%" in capsys.readouterr().out
    conv = tmp_path / "train.json"
    assert main(["eval", "scienceqa-to-llava", "--data", str(SQA), "--split", "train", "--format", "CQM-A",
                 "--out", str(conv)]) == 0  # fmt: skip
    records = json.loads(conv.read_text())
    assert records[0]["conversations"][1]["value"] == "The answer is B."


# --- ensemble ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "judge", "expected"),
    [
        ("A", "A", None, ("A", "agree")),
        ("A", "B", "Both argue well. The answer is B.", ("B", "judge")),
        ("A", "B", "I am not sure.", ("A", "fallback-a")),
        (None, "B", "no idea", ("B", "fallback-b")),
        (None, None, None, (None, "none")),
        ("A", "B", "The answer is E.", ("A", "fallback-a")),  # E is not among 4 choices
    ],
)
def test_ensemble_decision_rule(a: str | None, b: str | None, judge: str | None, expected: tuple) -> None:
    assert decide(a, b, judge, 4) == expected


def test_ensemble_arithmetic() -> None:
    problems = load_split(SQA, "test")
    gold = {p.pid: p.answer_letter for p in problems}
    a = load_answer_texts(ANSWERS)  # 3 right (101, 102, 105)
    b = {pid: f"The answer is {gold[pid]}." for pid in ("103", "104", "107")} | {"101": "B", "102": "B"}
    asked: list[str] = []

    def judge(keyed: list[tuple[str, list[dict]]]) -> list[tuple[str | None, str | None]]:
        asked.extend(k for k, _ in keyed)
        # The judge backs B on 103 and 107, returns nonsense on 104, answers wrongly on 101.
        replies = {"ensemble:103": "The answer is A.", "ensemble:107": "The answer is D.", "ensemble:101": "The answer is C."}
        return [(replies.get(k, "hmm"), None) for k, _ in keyed]

    decisions, report = run_ensemble(problems, a, b, judge)
    # disputed: 101 (A vs B), 103 (B vs A), 104 (- vs C), 105 (E vs -), 106 (- vs -: agree on nothing),
    # 107 (- vs D), 108 (- vs -) -> 101, 103, 104, 105, 107 go to the judge; 102 agrees on B.
    assert sorted(asked) == [f"ensemble:{p}" for p in ("101", "103", "104", "105", "107")]
    by = {d.pid: d for d in decisions}
    assert (by["101"].final, by["101"].source) == ("C", "judge")
    assert (by["104"].final, by["104"].source) == ("C", "fallback-b")
    assert (by["105"].final, by["105"].source) == ("E", "fallback-a")
    # ensemble right: 102, 103, 104, 105, 107 = 5/8; A 3/8; B (103,104,107,102) 4/8
    assert report["ensemble"]["accuracy"] == 62.5
    assert report["a"]["accuracy"] == 37.5 and report["b"]["accuracy"] == 50.0
    assert report["upper_bound"] == 75.0  # A or B right on all but 106 and 108
    assert report["disagreements"] == 5


def test_ensemble_cli_through_engine(tmp_path: Path) -> None:
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"question_id": str(p), "text": "The answer is A."}) + "\n" for p in range(101, 109)))
    with FakeOpenAI(reply=lambda body: "Student 2 is right. The answer is A.") as server:
        out = tmp_path / "ens.json"
        argv = ["eval", "ensemble", "--data", str(SQA), "--answers", str(ANSWERS), "--second", str(b),
                "--out", str(out), "--base-url", server.base_url, "--model", "judge", "--api-key-env", "NO_SUCH_KEY_VAR"]  # fmt: skip
        assert main(argv) == 0
        report = json.loads(out.read_text())
        first = server.request_count
        assert main(argv) == 0
        assert server.request_count == first  # second run: all judge replies come from the cache
    # A agrees with B ("A") on 101 only; the 7 others are judged and the judge always says A.
    assert first == 7 and report["disagreements"] == 7
    gold_a = {"101", "103", "106"}  # problems whose gold letter is A
    assert report["ensemble"]["correct"] == len(gold_a)
