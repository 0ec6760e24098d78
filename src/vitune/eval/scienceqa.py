"""ScienceQA: reading the official release, the papers' prompt formats, answer extraction and the
official evaluator's accuracy breakdown, plus the conversion of a split into LLaVA training data.

The release is a folder with `problems.json` ({pid: problem}), `pid_splits.json` ({split: [pid]})
and `images/<split>/<pid>/image.png`. Two prompt formats, as in LLaVA:

- `CQM-A` (context, question, options -> answer): the answer only, "The answer is X."; with
  `single_pred_prompt` the question ends "Answer with the option's letter from the given choices
  directly." and the model is expected to reply with the bare letter (LLaVA-1.5's evaluation).
- `QCM-LEA` (question, context, options -> lecture, explanation, answer): the paper's format; the
  reply ends "The answer is X.".

The breakdown follows `tools/evaluate_acc.py` of the ScienceQA repository: NAT/SOC/LAN by subject,
TXT = has a text context (non-empty hint, with or without an image), IMG = has an image, NO =
neither, G1-6 / G7-12 by grade; accuracy is over all problems of the split (missing answers are
wrong).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitune.errors import VituneError
from vitune.eval.io import read_json

OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
PROMPT_FORMATS: tuple[str, ...] = ("CQM-A", "QCM-LEA")
SINGLE_PRED_SUFFIX = "Answer with the option's letter from the given choices directly."
CATEGORY_KEYS: tuple[str, ...] = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECTS: dict[str, str] = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
GRADES_1_6 = frozenset(f"grade{i}" for i in range(1, 7))
GRADES_7_12 = frozenset(f"grade{i}" for i in range(7, 13))
IMAGE_MARKER = "<image>"

_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")
_LETTER_DOT = re.compile(r"([A-Z])\. ")


@dataclass(frozen=True)
class Problem:
    """One ScienceQA problem, fields as in `problems.json` (pid is the key there)."""

    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str
    image: str | None
    subject: str
    topic: str
    grade: str
    lecture: str
    solution: str
    split: str
    category: str = ""
    skill: str = ""
    task: str = ""

    @property
    def answer_letter(self) -> str:
        return OPTIONS[self.answer]

    def to_json(self) -> dict:
        return {
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
            "hint": self.hint,
            "image": self.image,
            "task": self.task,
            "grade": self.grade,
            "subject": self.subject,
            "topic": self.topic,
            "category": self.category,
            "skill": self.skill,
            "lecture": self.lecture,
            "solution": self.solution,
            "split": self.split,
        }


def problem_from_json(pid: str, record: object, where: str) -> Problem:
    if not isinstance(record, dict):
        raise VituneError(f"{where}: problem {pid!r} is not a JSON object")

    def field(name: str, kind: type | tuple[type, ...], default: object = None) -> object:
        if name not in record:
            if default is not None:
                return default
            raise VituneError(f"{where}: problem {pid!r}: missing field {name!r}")
        value = record[name]
        if not isinstance(value, kind):
            raise VituneError(f"{where}: problem {pid!r}: field {name!r} has type {type(value).__name__}")
        return value

    choices = field("choices", list)
    if not 2 <= len(choices) <= len(OPTIONS) or not all(isinstance(c, str) for c in choices):  # type: ignore[arg-type]
        raise VituneError(f"{where}: problem {pid!r}: 'choices' must be 2-{len(OPTIONS)} strings")
    answer = field("answer", int)
    if isinstance(answer, bool) or not 0 <= answer < len(choices):  # type: ignore[operator,arg-type]
        raise VituneError(f"{where}: problem {pid!r}: 'answer' {answer} is not an index into its {len(choices)} choices")  # type: ignore[arg-type]
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise VituneError(f"{where}: problem {pid!r}: 'image' must be a file name or null")
    return Problem(
        pid=str(pid),
        question=str(field("question", str)),
        choices=tuple(choices),  # type: ignore[arg-type]
        answer=int(answer),  # type: ignore[arg-type]
        hint=str(field("hint", str, "")),
        image=image or None,
        subject=str(field("subject", str)),
        topic=str(field("topic", str, "")),
        grade=str(field("grade", str)),
        lecture=str(field("lecture", str, "")),
        solution=str(field("solution", str, "")),
        split=str(field("split", str, "")),
        category=str(field("category", str, "")),
        skill=str(field("skill", str, "")),
        task=str(field("task", str, "")),
    )


def load_problems(data_dir: str | Path) -> dict[str, Problem]:
    path = Path(data_dir) / "problems.json"
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise VituneError(f"{path}: expected an object {{pid: problem}}")
    return {str(pid): problem_from_json(str(pid), rec, str(path)) for pid, rec in raw.items()}


def load_split(data_dir: str | Path, split: str) -> list[Problem]:
    """The problems of one split, in the order of `pid_splits.json`."""
    problems = load_problems(data_dir)
    path = Path(data_dir) / "pid_splits.json"
    splits = read_json(path)
    if not isinstance(splits, dict):
        raise VituneError(f"{path}: expected an object {{split: [pid, ...]}}")
    if split not in splits:
        raise VituneError(f"{path}: no split {split!r} (has: {', '.join(sorted(splits))})")
    out = []
    for pid in splits[split]:
        if str(pid) not in problems:
            raise VituneError(f"{path}: split {split!r} lists pid {pid!r}, which problems.json lacks")
        out.append(problems[str(pid)])
    return out


def image_path(data_dir: str | Path, problem: Problem, split: str | None = None) -> Path | None:
    """`images/<split>/<pid>/<image>` of the release, or None for a text-only problem."""
    if problem.image is None:
        return None
    return Path(data_dir) / "images" / (split or problem.split) / problem.pid / problem.image


def context_text(problem: Problem) -> str:
    # The papers run without image captions (use_caption=False), so the context is the hint.
    return problem.hint.strip() or "N/A"


def choice_text(problem: Problem) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem.choices))


def build_prompt(problem: Problem, fmt: str, single_pred_prompt: bool = False) -> str:
    """The user turn: `<image>` first when the problem has an image (LLaVA moves it there too)."""
    check_format(fmt)
    context, question, options = context_text(problem), problem.question.strip(), choice_text(problem)
    if fmt.startswith("CQM"):
        text = f"Context: {context}\nQuestion: {question}\nOptions: {options}"
    else:  # QCM: LLaVA's conversion drops the leading "Question: "
        text = f"{question}\nContext: {context}\nOptions: {options}"
    text = text.replace("  ", " ").strip()
    if single_pred_prompt:
        text = f"{text}\n{SINGLE_PRED_SUFFIX}"
    if problem.image is not None:
        text = f"{IMAGE_MARKER}\n{text}"
    return text


def build_target(problem: Problem, fmt: str, single_pred_prompt: bool = False) -> str:
    """The assistant turn a model is trained to produce in this format (the bare letter when the
    prompt asks for the letter directly)."""
    check_format(fmt)
    answer = f"The answer is {problem.answer_letter}."
    if fmt.endswith("-A"):
        return problem.answer_letter if single_pred_prompt else answer
    parts = [problem.lecture.strip(), problem.solution.strip(), answer]
    return " ".join(p for p in parts if p).replace("  ", " ")


def check_format(fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise VituneError(f"unknown ScienceQA prompt format {fmt!r} (known: {', '.join(PROMPT_FORMATS)})")


def extract_answer(text: str, n_choices: int = len(OPTIONS)) -> str | None:
    """The option letter of a reply, or None when it cannot be read.

    Accepted, in order: the bare letter ("B"); a reply opening with "B. "; exactly one
    "The answer is B." anywhere. A letter beyond the problem's choices is unreadable too.
    """
    valid = OPTIONS[:n_choices]
    stripped = text.strip()
    letter: str | None = None
    if stripped in valid:
        letter = stripped
    elif (m := _LETTER_DOT.match(stripped)) is not None:
        letter = m.group(1)
    else:
        found = _ANSWER_IS.findall(text)
        if len(found) == 1:
            letter = found[0]
    return letter if letter in valid else None


def _percent(correct: int, total: int) -> float | None:
    return round(100.0 * correct / total, 2) if total else None


def category_members(problem: Problem) -> list[str]:
    """The breakdown keys a problem counts under, as the official evaluator assigns them."""
    keys = [k for k, subject in SUBJECTS.items() if problem.subject == subject]
    has_text, has_image = bool(problem.hint), problem.image is not None
    if has_text:
        keys.append("TXT")
    if has_image:
        keys.append("IMG")
    if not has_text and not has_image:
        keys.append("NO")
    if problem.grade in GRADES_1_6:
        keys.append("G1-6")
    elif problem.grade in GRADES_7_12:
        keys.append("G7-12")
    return keys


def score_scienceqa(problems: Sequence[Problem], answers: Mapping[str, str]) -> dict:
    """Accuracy (percent) over `problems`, the official breakdown and per-topic accuracy.

    `answers` maps pid -> the model's raw reply. Missing pids count as wrong and are listed;
    replies that `extract_answer` cannot read count as wrong and are listed as unparsed.
    """
    if not problems:
        raise VituneError("no ScienceQA problems to score")
    totals: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    topic_totals: Counter[str] = Counter()
    topic_hits: Counter[str] = Counter()
    unparsed: list[str] = []
    missing: list[str] = []
    predictions: dict[str, int] = {}
    correct = 0
    for problem in problems:
        reply = answers.get(problem.pid)
        letter = None
        if reply is None:
            missing.append(problem.pid)
        else:
            letter = extract_answer(reply, len(problem.choices))
            if letter is None:
                unparsed.append(problem.pid)
        pred = OPTIONS.index(letter) if letter is not None else -1
        predictions[problem.pid] = pred
        ok = pred == problem.answer
        correct += ok
        for key in category_members(problem):
            totals[key] += 1
            hits[key] += ok
        topic_totals[problem.topic] += 1
        topic_hits[problem.topic] += ok
    known = {p.pid for p in problems}
    return {
        "accuracy": _percent(correct, len(problems)),
        "correct": correct,
        "n": len(problems),
        "by_category": {k: _percent(hits[k], totals[k]) for k in CATEGORY_KEYS},
        "by_category_n": {k: totals[k] for k in CATEGORY_KEYS},
        "by_topic": {
            t: {"accuracy": _percent(topic_hits[t], topic_totals[t]), "n": topic_totals[t]}
            for t in sorted(topic_totals)
        },
        "unparsed": unparsed,
        "missing": missing,
        "extra": sorted(pid for pid in answers if pid not in known),
        "predictions": predictions,
    }


def format_table(result: dict) -> str:
    lines = [f"ScienceQA accuracy: {result['accuracy']:.2f}% ({result['correct']}/{result['n']})"]
    header = "  ".join(f"{k:>6}" for k in CATEGORY_KEYS)
    values = "  ".join(
        f"{v:6.2f}" if v is not None else f"{'-':>6}" for v in (result["by_category"][k] for k in CATEGORY_KEYS)
    )
    lines += [header, values]
    if result["unparsed"] or result["missing"]:
        lines.append(f"unparsed: {len(result['unparsed'])}, missing: {len(result['missing'])}")
    return "\n".join(lines)


def to_llava(problems: Sequence[Problem], fmt: str, single_pred_prompt: bool = False) -> list[dict]:
    """LLaVA conversations for fine-tuning, in the prompt format the evaluation uses.

    `image` is relative to the split's image folder (`images/<split>`), as in LLaVA's own
    conversion; text-only problems have no `image`.
    """
    out = []
    for problem in problems:
        record: dict = {"id": problem.pid}
        if problem.image is not None:
            record["image"] = f"{problem.pid}/{problem.image}"
        record["conversations"] = [
            {"from": "human", "value": build_prompt(problem, fmt, single_pred_prompt)},
            {"from": "gpt", "value": build_target(problem, fmt, single_pred_prompt)},
        ]
        out.append(record)
    return out
