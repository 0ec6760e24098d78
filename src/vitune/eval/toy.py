"""The synthetic-world evaluation tasks, on held-out scenes (`W/test.jsonl` by default).

- `toy-vqa`: short-answer questions by type (colour, shape, count, position, existence,
  relation), from the same generator the rules teacher trains on; normalised exact match, with
  each type's chance level (uniform guessing over the type's answer set).
- `toy-scienceqa`: the same kinds of questions as multiple choice in the ScienceQA
  `problems.json` schema (subject "natural science", topic = question type), asked in a ScienceQA
  prompt format and scored by the ScienceQA scorer; chance = 1 / number of choices.
  `write_scienceqa_release` exports them as an official-layout folder.
- `toy-bench`: LLaVA-Bench-style conv / detail / complex questions with the rules teacher's
  answers as references, judged by the offline rules judge (or any OpenAI-compatible judge);
  "chance" is the relative score of another scene's reference answer (an answer blind to the image).

Every scored result carries the summary the demo reads: `accuracy` and `chance` as fractions in
[0, 1] and `by_type: {TYPE: {"accuracy", "chance", "n"}}`; toy-vqa adds `by_objects: {N: {"accuracy",
"n", "by_type"}}`, the same by the scene's object count. Questions are drawn with one random
generator per scene (seeded by the task, the seed and the scene id), so answering in shards, with
a limit, or again later always asks the same questions.

`run_toy_task` answers and scores a task in one call, writing the same files as the CLI.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitune.errors import VituneError
from vitune.eval.answer import EvalItem
from vitune.io import atomic_write_json, atomic_write_jsonl
from vitune.eval.llava_bench import (
    Judge,
    JudgeInput,
    LLMJudge,
    judge_all,
    score_reviews,
)
from vitune.eval.scienceqa import OPTIONS, Problem, build_prompt, score_scienceqa
from vitune.world.questions import (
    SHORT_ANSWER_SUFFIX,
    Question,
    accuracy_by_type,
    article,
    chance_level,
    short_answer_questions,
)
from vitune.world.scene import Scene, read_scenes

TOY_TASKS: tuple[str, ...] = ("toy-vqa", "toy-scienceqa", "toy-bench")
DEFAULT_SPLIT = "test"
MAX_CHOICES = 4
# Elementary questions: ScienceQA's grade buckets are kept meaningful (G1-6) rather than invented.
TYPE_GRADES: dict[str, str] = {
    "color": "grade1", "shape": "grade1", "existence": "grade1",
    "count": "grade2", "position": "grade3", "relation": "grade4",
}  # fmt: skip
TYPE_LECTURES: dict[str, str] = {
    "color": "Every object in a picture has a color, such as red, green or blue.",
    "shape": "Flat shapes have names: a circle is round, a square has four equal sides, a triangle has three sides and a star has points.",
    "count": "To count objects, point at each one once and say the next number.",
    "position": "A picture can be split into a top, middle and bottom row and a left, center and right column.",
    "existence": "To check whether a picture contains something, look at every object in it.",
    "relation": "One object is left of another when it is closer to the left edge, and above it when it is closer to the top edge.",
}
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


def check_task(task: str) -> None:
    if task not in TOY_TASKS:
        raise VituneError(f"unknown synthetic-world task {task!r}; choose one of: {', '.join(TOY_TASKS)}")


def load_scenes(world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None) -> list[Scene]:
    path = Path(world) / f"{split}.jsonl"
    if not path.is_file():
        raise VituneError(f"{path}: no such split file (render the world with `vitune world render --out {world}`)")
    scenes = []
    for scene in read_scenes(path):
        if limit is not None and len(scenes) >= limit:
            break
        scenes.append(scene)
    if not scenes:
        raise VituneError(f"{path}: no scenes")
    return scenes


def scene_image(world: str | Path, scene: Scene) -> Path:
    if not scene.image:
        raise VituneError(f"scene {scene.id}: no image")
    return Path(world) / scene.image


def scene_rng(task: str, seed: int, scene: Scene) -> random.Random:
    return random.Random(f"{task}:{seed}:{scene.id}")


# --- toy-vqa ----------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, first line, no quotes or trailing punctuation, no leading article, number
    words as digits, hyphens as spaces: "The Top-Left." -> "top left", "Three" -> "3"."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    t = lines[0].strip().lower() if lines else ""
    t = re.sub(r"[\"'`*]", "", t).replace("-", " ").replace("centre", "center").replace("colour", "color")
    t = re.sub(r"[.!?,;:]+$", "", t).strip()
    t = re.sub(r"^(?:the|a|an)\s+", "", t)
    t = " ".join(t.split())
    return _NUMBER_WORDS.get(t, t)


def vqa_questions(
    world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0,
    per_type: int | Mapping[str, int] | Callable[[Scene], Mapping[str, int]] = 1,
) -> Iterator[tuple[Scene, list[Question]]]:
    """Each scene of the split with the short-answer questions toy-vqa asks about it (`per_type`
    may depend on the scene: a function of it)."""
    for scene in load_scenes(world, split, limit):
        counts = per_type(scene) if callable(per_type) else per_type
        yield scene, short_answer_questions(scene, scene_rng("toy-vqa", seed, scene), per_type=counts)


def vqa_items(
    world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0, per_type: int | Mapping[str, int] = 1,
) -> list[EvalItem]:
    items = []
    for scene, questions in vqa_questions(world, split, limit, seed, per_type):
        for k, q in enumerate(questions):
            items.append(
                EvalItem(
                    question_id=f"{scene.id}:{k}",
                    prompt=f"<image>\n{q.short_answer_prompt}",
                    images=(scene_image(world, scene),),
                    fields={"type": q.type, "answer": q.answer, "image": scene.image, "objects": len(scene.instances)},
                )
            )
    return items


def score_vqa(items: Sequence[EvalItem], answers: dict[str, str]) -> dict:
    """Exact match after `normalize_answer`, per question type, with chance levels."""
    if not items:
        raise VituneError("toy-vqa: no questions to score")
    per_type: dict[str, list[bool]] = {}
    # Crowded scenes are where a small model's second look-up fails (relation with three
    # distractors), so scores are also kept by the scene's object count.
    per_count: dict[int, dict[str, list[bool]]] = {}
    missing = []
    for item in items:
        reply = answers.get(str(item.question_id))
        if reply is None:
            missing.append(item.question_id)
        ok = reply is not None and normalize_answer(reply) == normalize_answer(item.fields["answer"])
        per_type.setdefault(item.fields["type"], []).append(ok)
        if "objects" in item.fields:
            per_count.setdefault(item.fields["objects"], {}).setdefault(item.fields["type"], []).append(ok)
    summary = accuracy_by_type(per_type)
    by_objects = {}
    for count, hits in sorted(per_count.items()):
        part = accuracy_by_type(hits)
        by_objects[str(count)] = {"accuracy": part["accuracy"], "n": part["n"],
                                  "by_type": {t: {k: v[k] for k in ("accuracy", "n")} for t, v in part["by_type"].items()}}
    return {
        "task": "toy-vqa",
        "accuracy": summary["accuracy"],
        "chance": summary["chance"],
        "n": summary["n"],
        "by_type": summary["by_type"],
        "by_objects": by_objects,
        "missing": missing,
        "extra": sorted(set(answers) - {str(i.question_id) for i in items}),
    }


# --- toy-scienceqa ----------------------------------------------------------------------------


def _solution(q: Question) -> str:
    if q.type == "color":
        return f"Look at {q.subject}. Its color is {q.answer}."
    if q.type == "shape":
        return f"Look at {q.subject}. It is {article(q.answer)}."
    if q.type == "count":
        return f"Count the {q.subject} in the image. There are {q.answer}." if q.answer != "1" else f"Count the {q.subject} in the image. There is 1."
    if q.type == "position":
        return f"Find {q.subject} in the image. It is in the {q.answer}."
    if q.type == "existence":
        return f"There is {article(q.subject)} in the image." if q.answer == "yes" else f"There is no {q.subject} in the image."
    return f"Compare where {q.subject} and {q.other} are. {q.subject[:1].upper()}{q.subject[1:]} is {q.answer} {q.other}."


def scienceqa_problems(
    world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0
) -> list[tuple[Problem, Path]]:
    """Multiple-choice problems in the ScienceQA schema, each with its scene's image file."""
    out = []
    for scene in load_scenes(world, split, limit):
        rng = scene_rng("toy-scienceqa", seed, scene)
        for k, q in enumerate(short_answer_questions(scene, rng, per_type=1)):
            if q.type == "existence":
                choices = ["yes", "no"]
            else:
                distractors = [c for c in q.choices if c != q.answer]
                choices = [q.answer, *rng.sample(distractors, min(MAX_CHOICES - 1, len(distractors)))]
                rng.shuffle(choices)
            problem = Problem(
                pid=f"{scene.id}-{k}",
                question=q.question,
                choices=tuple(choices),
                answer=choices.index(q.answer),
                hint="",
                image="image.png",
                subject="natural science",
                topic=q.type,
                grade=TYPE_GRADES[q.type],
                lecture=TYPE_LECTURES[q.type],
                solution=_solution(q),
                split=split,
                category=f"Identify {q.type}",
                skill=f"Identify {q.type} in a picture",
                task="closed choice",
            )
            out.append((problem, scene_image(world, scene)))
    return out


def scienceqa_items(
    world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0,
    fmt: str = "CQM-A", single_pred_prompt: bool = True,
) -> list[EvalItem]:  # fmt: skip
    return [
        EvalItem(
            question_id=p.pid,
            prompt=build_prompt(p, fmt, single_pred_prompt),
            images=(image,),
            fields={"type": p.topic, "answer": OPTIONS[p.answer], "choices": list(p.choices)},
        )
        for p, image in scienceqa_problems(world, split, limit, seed)
    ]


def score_toy_scienceqa(problems: Sequence[Problem], answers: dict[str, str]) -> dict:
    sqa = score_scienceqa(problems, answers)
    correct = {p.pid: sqa["predictions"][p.pid] == p.answer for p in problems}
    by_type: dict[str, dict[str, Any]] = {}
    for topic in sorted({p.topic for p in problems}):
        mine = [p for p in problems if p.topic == topic]
        by_type[topic] = {
            "accuracy": sum(correct[p.pid] for p in mine) / len(mine),
            "chance": statistics.fmean(1 / len(p.choices) for p in mine),
            "n": len(mine),
        }
    sqa.pop("predictions")
    return {
        "task": "toy-scienceqa",
        "accuracy": sqa["correct"] / sqa["n"],
        "chance": statistics.fmean(1 / len(p.choices) for p in problems),
        "n": sqa["n"],
        "by_type": by_type,
        "scienceqa": sqa,
    }


def write_scienceqa_release(problems: Sequence[tuple[Problem, Path]], out: str | Path) -> Path:
    """An official-layout ScienceQA folder (`problems.json`, `pid_splits.json`,
    `images/<split>/<pid>/image.png`, images hard-linked where possible), so `vitune eval score
    scienceqa --data OUT` and other tools read the toy problems as they read the real ones."""
    out = Path(out)
    splits: dict[str, list[str]] = {}
    for problem, image in problems:
        splits.setdefault(problem.split, []).append(problem.pid)
        target = out / "images" / problem.split / problem.pid / str(problem.image)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(image, target)
        except OSError:
            shutil.copyfile(image, target)
    atomic_write_json(out / "problems.json", {p.pid: p.to_json() for p, _ in problems})
    atomic_write_json(out / "pid_splits.json", splits)
    return out


# --- toy-bench --------------------------------------------------------------------------------

BENCH_CATEGORIES: tuple[str, ...] = ("conv", "detail", "complex")
_RULES_KIND = {"conv": "conversation", "detail": "detail", "complex": "complex"}


@dataclass(frozen=True)
class BenchQuestion:
    question_id: str
    category: str
    question: str
    reference: str
    scene: Scene


def bench_questions(world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0) -> list[BenchQuestion]:
    """One question per category and scene, with the rules teacher's answer as the reference.
    For `conv`, one exchange of a generated conversation, preferring open (full-sentence) ones."""
    from vitune.datagen import rules
    from vitune.datagen.teachers import load_prompt

    instructions = list(load_prompt("detail").instructions)
    out = []
    for scene in load_scenes(world, split, limit):
        rng = scene_rng("toy-bench", seed, scene)
        for category in BENCH_CATEGORIES:
            sample = rules.generate(scene, _RULES_KIND[category], rng, instructions)
            pairs = [(sample.turns[i].text, sample.turns[i + 1].text) for i in range(0, len(sample.turns) - 1, 2)]
            open_pairs = [p for p in pairs if SHORT_ANSWER_SUFFIX not in p[0]]
            question, reference = rng.choice(open_pairs or pairs)
            out.append(BenchQuestion(f"{scene.id}/{category}", category, question, reference, scene))
    return out


def bench_items(world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    return [
        EvalItem(
            question_id=q.question_id,
            prompt=f"<image>\n{q.question}",
            images=(scene_image(world, q.scene),),
            fields={"category": q.category, "image": q.scene.image},
        )
        for q in bench_questions(world, split, limit, seed)
    ]


def _judge_inputs(questions: Sequence[BenchQuestion], answers: dict[str, str]) -> list[JudgeInput]:
    from vitune.datagen.context import context_text

    missing = [q.question_id for q in questions if q.question_id not in answers]
    if missing:
        raise VituneError(f"toy-bench: no answer for {len(missing)} question(s), e.g. {missing[:3]}")
    return [
        JudgeInput(
            q.question_id,
            q.category,
            context_text(q.scene),
            q.question,
            q.reference,
            answers[q.question_id],
            extra={"scene": q.scene},
        )
        for q in questions
    ]


def bench_judge_inputs(
    world: str | Path, answers: dict[str, str], split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0
) -> list[JudgeInput]:
    return _judge_inputs(bench_questions(world, split, limit, seed), answers)


def make_judge(kind: str, config: Any = None, temperature: float = 0.2, max_tokens: int = 1024) -> Judge:
    """`rules` (offline) or `openai` (an OpenAI-compatible model; `config` is an EngineConfig)."""
    if kind == "rules":
        from vitune.eval.judge_rules import RulesJudge

        return RulesJudge()
    if kind == "openai":
        if config is None:
            raise VituneError("the openai judge needs an engine configuration (--base-url, --model)")
        return LLMJudge(config, temperature, max_tokens)
    raise VituneError(f"unknown judge {kind!r}; choose rules or openai")


def bench_chance(questions: Sequence[BenchQuestion]) -> dict[str, float | None]:
    """Relative score / 100 (rules judge) of answering each question with the reference answer of
    the same category for the next scene: what an answer that ignores the image earns."""
    from vitune.eval.judge_rules import RulesJudge

    by_cat: dict[str, list[BenchQuestion]] = {c: [q for q in questions if q.category == c] for c in BENCH_CATEGORIES}
    blind: dict[str, str] = {}
    for qs in by_cat.values():
        for i, q in enumerate(qs):
            blind[q.question_id] = qs[(i + 1) % len(qs)].reference if len(qs) > 1 else ""
    result = score_reviews(judge_all(_judge_inputs(questions, blind), RulesJudge()))
    return {c: (e["relative"] / 100 if e["relative"] is not None else None) for c, e in result["categories"].items()}


def score_bench(
    world: str | Path,
    answers: dict[str, str],
    judge: Judge,
    reviews_out: str | Path,
    split: str = DEFAULT_SPLIT,
    limit: int | None = None,
    seed: int = 0,
    judge_runs: int = 1,
) -> dict:
    """Judge every answer (writing the reviews JSONL) and score the reviews as LLaVA-Bench does."""
    questions = bench_questions(world, split, limit, seed)
    reviews = judge_all(_judge_inputs(questions, answers), judge, judge_runs)
    atomic_write_jsonl(reviews_out, reviews)
    result = score_reviews(reviews)
    chance = bench_chance(questions)
    cats = result["categories"]

    def frac(value: float | None) -> float:
        # The relative score can pass 100 (a model the judge prefers to the reference); the
        # summary is a fraction in [0, 1], the raw figure stays under "categories".
        return min(1.0, value / 100) if value is not None else 0.0

    return {
        "task": "toy-bench",
        "accuracy": frac(cats["all"]["relative"]),
        "chance": chance["all"] or 0.0,
        "n": cats["all"]["n"],
        "by_type": {c: {"accuracy": frac(cats[c]["relative"]), "chance": chance[c] or 0.0, "n": cats[c]["n"]} for c in BENCH_CATEGORIES},
        "judge": judge.name,
        "reviews": str(reviews_out),
        **result,
    }


# --- one entry per task -----------------------------------------------------------------------


def task_items(
    task: str, world: str | Path, split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0,
    fmt: str = "CQM-A", single_pred_prompt: bool = True,
) -> list[EvalItem]:  # fmt: skip
    check_task(task)
    if task == "toy-vqa":
        return vqa_items(world, split, limit, seed)
    if task == "toy-scienceqa":
        return scienceqa_items(world, split, limit, seed, fmt, single_pred_prompt)
    return bench_items(world, split, limit, seed)


def score_task(
    task: str, world: str | Path, answers: dict[str, str], split: str = DEFAULT_SPLIT, limit: int | None = None, seed: int = 0
) -> dict:
    """Score toy-vqa or toy-scienceqa answers (toy-bench needs a judge: `score_bench`)."""
    check_task(task)
    if task == "toy-vqa":
        return score_vqa(vqa_items(world, split, limit, seed), answers)
    if task == "toy-scienceqa":
        return score_toy_scienceqa([p for p, _ in scienceqa_problems(world, split, limit, seed)], answers)
    raise VituneError("toy-bench answers are scored through a judge: use score_bench (or `vitune eval score toy-bench`)")


MAX_NEW_TOKENS: dict[str, int] = {"toy-vqa": 16, "toy-scienceqa": 16, "toy-bench": 256}


def run_toy_task(
    task: str,
    world: str | Path,
    model: str | Path | Any,
    out_dir: str | Path,
    limit: int | None = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    judge: Judge | None = None,
    judge_runs: int = 1,
    progress: bool = True,
) -> dict:
    """Answer and score one synthetic-world task; `model` is a model directory or a loaded
    `vitune.inference.Pipeline`. Writes `out_dir/TASK.answers.jsonl` (resumable: answered
    questions are kept), `out_dir/TASK.json`, and for toy-bench `out_dir/TASK.reviews.jsonl`
    (rules judge unless `judge` is given). Returns the result dict (`accuracy`, `chance`,
    `by_type`, ...), the same as `vitune eval score TASK` writes."""
    from vitune.eval.answer import PipelineAnswerer, load_answer_texts, run_answers
    from vitune.inference import SamplingParams

    check_task(task)
    out_dir = Path(out_dir)
    answers_path = out_dir / f"{task}.answers.jsonl"
    items = task_items(task, world, limit=limit, seed=seed)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS[task], temperature=0.0)
    if isinstance(model, (str, Path)):
        answerer = PipelineAnswerer.from_model_dir(model, params, batch_size, device=device)
    else:
        answerer = PipelineAnswerer(model, params, batch_size, name="pipeline")
    run = run_answers(items, answerer, answers_path, progress=progress)
    if run.failed:
        raise VituneError(f"{task}: {len(run.failed)} question(s) failed, e.g. {run.failed[0]}")
    answers = load_answer_texts(answers_path)
    if task == "toy-bench":
        result = score_bench(world, answers, judge or make_judge("rules"), out_dir / f"{task}.reviews.jsonl",
                             limit=limit, seed=seed, judge_runs=judge_runs)  # fmt: skip
    else:
        result = score_task(task, world, answers, limit=limit, seed=seed)
    atomic_write_json(out_dir / f"{task}.json", result)
    return result
