"""Synthetic-world tasks: question sets, answer normalisation, the rules judge's claims, scoring
summaries, the ScienceQA export, and `run_toy_task` with a scripted pipeline and a real tiny model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.eval.io import read_jsonl
from vitune.eval.judge_rules import (
    Claim,
    RulesJudge,
    answer_claims,
    check_claim,
    extract_claims,
)
from vitune.eval.llava_bench import judge_all, score_reviews
from vitune.eval.scienceqa import load_split, score_scienceqa
from vitune.eval.toy import (
    bench_judge_inputs,
    bench_questions,
    normalize_answer,
    run_toy_task,
    scienceqa_items,
    scienceqa_problems,
    score_task,
    vqa_items,
    write_scienceqa_release,
)
from vitune.generation import GenerationOutput
from vitune.world.questions import QUESTION_TYPES, chance_level
from vitune.world.scene import Instance, Scene

SUMMARY_KEYS = {"accuracy", "chance", "by_type"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitune.world.render import render_world

    out = tmp_path_factory.mktemp("world")
    render_world(out, scenes=4, eval_scenes=12, seed=3, size=48)
    return out


def _check_summary(result: dict) -> None:
    assert SUMMARY_KEYS <= set(result)
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["chance"] <= 1
    for entry in result["by_type"].values():
        assert set(entry) == {"accuracy", "chance", "n"} and 0 <= entry["accuracy"] <= 1 and entry["n"] > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Red", "red"), ("The Top-Left.", "top left"), ("three", "3"), (" 3 ", "3"), ("a circle!", "circle"),
     ("yes\nbecause", "yes"), ("'Left of'", "left of"), ("centre", "center"), ("", "")],
)  # fmt: skip
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_vqa_questions_are_stable_and_scored_per_type(world: Path) -> None:
    items = vqa_items(world, limit=6)
    assert [i.question_id for i in items] == [i.question_id for i in vqa_items(world, limit=6)]
    assert [i.prompt for i in vqa_items(world, limit=3)] == [i.prompt for i in items[: len(vqa_items(world, limit=3))]]
    assert {i.fields["type"] for i in items} <= set(QUESTION_TYPES)
    gold = {str(i.question_id): i.fields["answer"].title() + "." for i in items}
    result = score_task("toy-vqa", world, gold, limit=6)
    _check_summary(result)
    assert result["accuracy"] == 1.0 and result["n"] == len(items)
    for t, e in result["by_type"].items():
        assert e["chance"] == chance_level(t)
    # answering "yes" everywhere: right exactly on the existence questions whose answer is yes
    yes = {str(i.question_id): "yes" for i in items}
    result = score_task("toy-vqa", world, yes, limit=6)
    expected = sum(i.fields["answer"] == "yes" for i in items) / len(items)
    assert result["accuracy"] == pytest.approx(expected)
    assert result["by_type"]["color"]["accuracy"] == 0.0
    # the same scores by the scene's object count
    counts = {i.fields["objects"] for i in items}
    assert set(result["by_objects"]) == {str(c) for c in counts}
    assert sum(v["n"] for v in result["by_objects"].values()) == len(items)
    for c, v in result["by_objects"].items():
        mine = [i for i in items if i.fields["objects"] == int(c)]
        assert v["accuracy"] == pytest.approx(sum(i.fields["answer"] == "yes" for i in mine) / len(mine))
        assert sum(e["n"] for e in v["by_type"].values()) == len(mine)
    # missing answers count as wrong
    assert score_task("toy-vqa", world, {}, limit=6)["accuracy"] == 0.0


def test_toy_scienceqa_schema_and_release(world: Path, tmp_path: Path) -> None:
    pairs = scienceqa_problems(world, limit=5)
    for p, image in pairs:
        assert 2 <= len(p.choices) <= 4 and len(set(p.choices)) == len(p.choices) and image.is_file()
        assert p.subject == "natural science" and p.topic in QUESTION_TYPES
    items = scienceqa_items(world, limit=5)
    assert all(i.prompt.startswith("<image>\nContext: N/A\nQuestion: ") for i in items)
    answers = {str(i.question_id): i.fields["answer"] for i in items}
    result = score_task("toy-scienceqa", world, answers, limit=5)
    _check_summary(result)
    assert result["accuracy"] == 1.0 and result["scienceqa"]["accuracy"] == 100.0
    assert result["chance"] == pytest.approx(sum(1 / len(p.choices) for p, _ in pairs) / len(pairs))
    # the exported release is read back by the real ScienceQA loader and scorer
    release = write_scienceqa_release(pairs, tmp_path / "sqa")
    half = dict(list(answers.items())[::2])
    direct = score_task("toy-scienceqa", world, half, limit=5)["scienceqa"]
    via_release = score_scienceqa(load_split(release, "test"), half)
    assert via_release["accuracy"] == direct["accuracy"] and via_release["by_category"] == direct["by_category"]
    assert (release / "images" / "test" / pairs[0][0].pid / "image.png").is_file()


def _scene() -> Scene:
    return Scene("s", "i.png", (), (
        Instance("circle", (0.05, 0.05, 0.25, 0.25), "red", "small"),
        Instance("circle", (0.70, 0.70, 0.90, 0.90), "red", "large"),
        Instance("square", (0.70, 0.05, 0.90, 0.25), "blue", "small"),
    ))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "claims"),
    [
        ("There are two red circles.", [("count", ("red", "circle"), 2, True)]),
        ("There are 3 circles.", [("count", (None, "circle"), 3, False)]),
        ("The blue square is in the top right corner.",
         [("exists", ("blue", "square"), None, True), ("position", ("blue", "square"), ("right", "top"), True)]),
        ("There is no triangle.", [("absent", (None, "triangle"), None, True)]),
        ("There is a green star.", [("exists", ("green", "star"), None, False)]),
        ("The square is in the top left of the image, while the red circle is at the bottom.",
         [("exists", (None, "square"), None, True), ("position", (None, "square"), ("left", "top"), False),
          ("exists", ("red", "circle"), None, True), ("position", ("red", "circle"), (None, "bottom"), True)]),
        ("If one circle were removed, one circle would remain.", []),
        ("First, count the squares: there is one square.", [("count", (None, "square"), 1, True)]),
    ],
)  # fmt: skip
def test_rules_judge_claims(text: str, claims: list[tuple]) -> None:
    scene = _scene()
    got = [(c.kind, c.subject, c.value, check_claim(scene, c)) for c in extract_claims(text)]
    assert got == claims


def test_rules_judge_relations_and_pronouns() -> None:
    scene = _scene()
    [*_, rel] = extract_claims("The small red circle is to the left of the blue square.")
    assert rel == Claim("relation", ("red", "circle"), ("left of", ("blue", "square"))) and check_claim(scene, rel)
    assert Claim("exists", ("blue", "square")) in answer_claims("What color is the square?", "It is blue.")
    assert answer_claims("Is there a green star in the image?", "No.") == [Claim("absent", ("green", "star"))]


def test_rules_judge_scores_agreement(world: Path) -> None:
    questions = bench_questions(world, limit=8)
    refs = {q.question_id: q.reference for q in questions}
    judge = RulesJudge()
    perfect = score_reviews(judge_all(bench_judge_inputs(world, refs, limit=8), judge))
    assert perfect["categories"]["all"]["relative"] == 100.0 and perfect["unparsed"] == 0
    # answers written for other scenes (rotated by one) contradict or miss the facts of this one
    by_cat: dict[str, list[str]] = {}
    for q in questions:
        by_cat.setdefault(q.category, []).append(q.question_id)
    blind = {}
    for ids in by_cat.values():
        for i, qid in enumerate(ids):
            blind[qid] = refs[ids[(i + 1) % len(ids)]]
    worse = score_reviews(judge_all(bench_judge_inputs(world, blind, limit=8), judge))
    assert worse["categories"]["all"]["relative"] < 75
    assert worse["categories"]["detail"]["relative"] < perfect["categories"]["detail"]["relative"]


class ScriptedPipeline:
    """Stands in for `vitune.inference.Pipeline`: answers each (prompt, image) from a table."""

    def __init__(self, items: Sequence, answers: dict[str, str]) -> None:
        from PIL import Image

        self.table = {
            (i.prompt, Image.open(i.images[0]).convert("RGB").tobytes()): answers[str(i.question_id)] for i in items
        }
        self.calls = 0

    def generate(self, requests: Sequence, batch_size: int = 8) -> list[GenerationOutput]:
        self.calls += 1
        out = []
        for r in requests:
            assert len(r.images) == r.messages[-1]["content"].count("<image>") == 1
            key = (r.messages[-1]["content"], r.images[0].tobytes())
            out.append(GenerationOutput(self.table.get(key, "no idea"), [], [], "stop"))
        return out


def test_run_toy_task_files_and_summaries(world: Path, tmp_path: Path) -> None:
    from vitune.eval.toy import task_items

    for task in ("toy-vqa", "toy-scienceqa", "toy-bench"):
        items = task_items(task, world, limit=4)
        if task == "toy-bench":
            answers = {q.question_id: q.reference for q in bench_questions(world, limit=4)}
        else:
            answers = {str(i.question_id): i.fields["answer"] for i in items}
        pipe = ScriptedPipeline(items, answers)
        result = run_toy_task(task, world, pipe, tmp_path, limit=4, progress=False)
        _check_summary(result)
        assert result["accuracy"] == 1.0, task
        assert json.loads((tmp_path / f"{task}.json").read_text())["accuracy"] == 1.0
        assert len(read_jsonl(tmp_path / f"{task}.answers.jsonl")) == len(items)
        calls = pipe.calls
        run_toy_task(task, world, pipe, tmp_path, limit=4, progress=False)
        assert pipe.calls == calls  # resumed: nothing answered twice
    bench = json.loads((tmp_path / "toy-bench.json").read_text())
    assert set(bench["by_type"]) == {"conv", "detail", "complex"} and bench["chance"] < 1.0
    assert set(bench["categories"]) == {"conv", "detail", "complex", "all"}
    assert len(read_jsonl(tmp_path / "toy-bench.reviews.jsonl")) == len(task_items("toy-bench", world, limit=4))


def test_toy_cli_answer_score_and_judge(world: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    answers = tmp_path / "vqa.jsonl"
    common = ["--world", str(world), "--scenes", "2"]
    assert main(["eval", "answer", "toy-vqa", *common, "--model", str(tiny_model_dir), "--out", str(answers),
                 "--device", "cpu", "--max-new-tokens", "3", "--quiet"]) == 0  # fmt: skip
    lines = read_jsonl(answers)
    assert len(lines) == len(vqa_items(world, limit=2)) and all("type" in r and "answer" in r for r in lines)
    out = tmp_path / "vqa.json"
    assert main(["eval", "score", "toy-vqa", *common, "--answers", str(answers), "--out", str(out)]) == 0
    _check_summary(json.loads(out.read_text()))

    bench_answers = tmp_path / "bench.jsonl"
    refs = {q.question_id: q.reference for q in bench_questions(world, limit=2)}
    bench_answers.write_text("".join(json.dumps({"question_id": k, "text": v[: len(v) // 2]}) + "\n" for k, v in refs.items()))
    out = tmp_path / "bench.json"
    assert main(["eval", "score", "toy-bench", *common, "--answers", str(bench_answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _check_summary(result)
    assert 0 < result["accuracy"] <= 1 and (tmp_path / "bench.reviews.jsonl").is_file()
    reviews = tmp_path / "rv.jsonl"
    assert main(["eval", "judge", "toy-bench", *common, "--answers", str(bench_answers), "--out", str(reviews)]) == 0
    assert main(["eval", "score", "llava-bench", "--reviews", str(reviews), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["categories"] == result["categories"]


def test_toy_cli_one_go_asks_with_its_seed(world: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seed5"
    assert main(["eval", "toy", "toy-vqa", "--world", str(world), "--model", str(tiny_model_dir), "--out-dir", str(out),
                 "--scenes", "3", "--seed", "5", "--device", "cpu"]) == 0  # fmt: skip
    asked = [r["prompt"] for r in read_jsonl(out / "toy-vqa.answers.jsonl")]
    assert asked == [i.prompt for i in vqa_items(world, limit=3, seed=5)]
    assert asked != [i.prompt for i in vqa_items(world, limit=3, seed=0)]
    result = json.loads((out / "toy-vqa.json").read_text())
    assert result["n"] == len(asked) and "by_objects" in result
