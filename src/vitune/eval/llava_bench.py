"""LLaVA-Bench: its files, the LLM judge's prompts, review parsing and the relative score.

Files, compatible with the published LLaVA-Bench ones:
- questions JSONL: `{"question_id", "image", "text", "category": "conv"|"detail"|"complex"}`;
- image contexts JSONL, one per image, matched on `image` (or `id`): the annotation format of the
  data-generation issue (`captions` + `instances` with boxes in [0, 1]) or a free-text
  description (`caption` / `description`, a string or a list of strings);
- answers JSONL (references and models alike): `{"question_id", "text", ...}`;
- reviews JSONL: `{"question_id", "category", "text": the judge's raw reply, "score": [reference,
  model] as parsed or null, "run": k}`.

The judge sees the context, the question, the reference answer as Assistant 1 and the model's
answer as Assistant 2, and writes both scores (1-10) on its first line; our prompts, one per
category, live in `prompts/judge_<category>.txt`. The relative score is 100 x mean(model) /
mean(reference), per category and over all reviews; with several judge runs, each run is scored
on its own and the mean and sample standard deviation over runs are reported, as the paper does.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from vitune.errors import VituneError
from vitune.eval.io import read_records

CATEGORIES: tuple[str, ...] = ("conv", "detail", "complex")
JUDGE_PROMPT_VERSION = "vitune-llava-bench-judge/v1"
REFERENCE_PROMPT_VERSION = "vitune-llava-bench-reference/v1"
SCORE_MIN, SCORE_MAX = 0.0, 10.0

_NUMBER = r"(\d+(?:\.\d+)?)"
# "Assistant 1: 8", "Assistant 1 score: 8/10", "Assistant 1's score = 8", "Assistant 1 receives a score of 8"
_LABELLED = {
    i: re.compile(
        rf"Assistant\s*{i}\b(?:'s)?\s*(?:receives|gets|scores|scored|deserves|is rated)?\s*(?:an?\s+)?"
        rf"(?:overall\s+)?(?:\(?score\)?|rating)?\s*(?:of|is)?\s*[:=\-–]?\s*\**\s*{_NUMBER}",
        re.IGNORECASE,
    )
    for i in (1, 2)
}
# A number, optionally "out of 10" / "/10", on the first line.
_FIRST_LINE_NUMBER = re.compile(rf"(?<![\d.]){_NUMBER}(?:\s*(?:/|out of)\s*10(?:\.0+)?\b)?")


@cache
def prompt_text(name: str) -> str:
    return resources.files("vitune.eval").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8").strip()


# --- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchQuestion:
    question_id: Any
    image: str
    text: str
    category: str


def load_questions(path: str | Path) -> list[BenchQuestion]:
    out: list[BenchQuestion] = []
    seen: set[str] = set()
    for i, rec in enumerate(read_records(path), 1):
        where = f"{path}: record {i}"
        for key in ("question_id", "text", "category"):
            if key not in rec:
                raise VituneError(f"{where}: missing field {key!r}")
        if rec["category"] not in CATEGORIES:
            raise VituneError(f"{where}: category {rec['category']!r} is not one of {', '.join(CATEGORIES)}")
        qid = str(rec["question_id"])
        if qid in seen:
            raise VituneError(f"{where}: question_id {rec['question_id']!r} appears twice")
        seen.add(qid)
        out.append(BenchQuestion(rec["question_id"], str(rec.get("image", "")), str(rec["text"]), rec["category"]))
    return out


def format_context(record: Mapping[str, Any]) -> str:
    """The text a text-only model sees instead of the image: the captions (or description), then
    one line per object `category: [x1, y1, x2, y2]` with 3 decimals. Annotation records get
    exactly the data-generation teacher's context (`vitune.datagen.context.context_text`)."""
    if isinstance(record.get("captions"), list) and "id" in record:
        from vitune.datagen.context import context_text
        from vitune.world.scene import Scene

        return context_text(Scene.from_json(dict(record), where=f"context {record.get('id')!r}"))
    lines: list[str] = []
    for key in ("captions", "caption", "description"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            lines.append(value.strip())
        elif isinstance(value, list):
            lines.extend(str(v).strip() for v in value if str(v).strip())
    boxes = []
    for inst in record.get("instances", []) or []:
        bbox = ", ".join(f"{float(v):.3f}" for v in inst["bbox"])
        boxes.append(f"{inst['category']}: [{bbox}]")
    text = "\n".join(lines)
    if boxes:
        text = f"{text}\n\n" + "\n".join(boxes) if text else "\n".join(boxes)
    return text


def load_contexts(path: str | Path) -> dict[str, str]:
    """image (and id) -> context text."""
    out: dict[str, str] = {}
    for i, rec in enumerate(read_records(path), 1):
        try:
            text = format_context(rec)
        except (KeyError, TypeError, ValueError) as err:
            raise VituneError(f"{path}: record {i}: bad instance ({type(err).__name__}: {err})") from err
        if not text:
            raise VituneError(f"{path}: record {i}: no captions, caption, description or instances")
        keys = [str(rec[k]) for k in ("image", "id") if k in rec]
        if not keys:
            raise VituneError(f"{path}: record {i}: needs an 'image' or 'id' to match questions")
        for key in keys:
            out[key] = text
            out.setdefault(Path(key).stem, text)
    return out


def context_for(question: BenchQuestion, contexts: Mapping[str, str], where: str) -> str:
    for key in (question.image, Path(question.image).stem):
        if key in contexts:
            return contexts[key]
    raise VituneError(f"{where}: no context for image {question.image!r} (question {question.question_id!r})")


# --- judging ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeInput:
    question_id: Any
    category: str
    context: str
    question: str
    reference: str
    answer: str
    extra: dict = field(default_factory=dict, compare=False)  # e.g. the scene, for the rules judge


def judge_messages(item: JudgeInput) -> list[dict]:
    if item.category not in CATEGORIES:
        raise VituneError(f"question {item.question_id!r}: no judge prompt for category {item.category!r}")
    content = (
        f"[Context]\n{item.context}\n\n"
        f"[Question]\n{item.question}\n\n"
        f"[Assistant 1]\n{item.reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{item.answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{prompt_text(f'judge_{item.category}')}\n"
    )
    return [{"role": "system", "content": prompt_text("judge_system")}, {"role": "user", "content": content}]


def reference_messages(context: str, question: str) -> list[dict]:
    content = f"[Image description]\n{context}\n\n[Question]\n{question}"
    return [{"role": "system", "content": prompt_text("reference_system")}, {"role": "user", "content": content}]


class Judge(Protocol):
    """Returns, per input, the raw review text (first line: two scores) or None on failure."""

    name: str

    def review(self, items: Sequence[JudgeInput], run: int) -> list[tuple[str | None, str | None]]: ...


def build_judge_inputs(
    questions: Sequence[BenchQuestion],
    contexts: Mapping[str, str],
    references: Mapping[str, str],
    answers: Mapping[str, str],
    where: str = "llava-bench",
) -> list[JudgeInput]:
    missing_ref = [q.question_id for q in questions if str(q.question_id) not in references]
    missing_ans = [q.question_id for q in questions if str(q.question_id) not in answers]
    if missing_ref:
        raise VituneError(f"{where}: no reference answer for {len(missing_ref)} question(s), e.g. {missing_ref[:5]}")
    if missing_ans:
        raise VituneError(f"{where}: no model answer for {len(missing_ans)} question(s), e.g. {missing_ans[:5]}")
    return [
        JudgeInput(
            question_id=q.question_id,
            category=q.category,
            context=context_for(q, contexts, where),
            question=q.text,
            reference=references[str(q.question_id)],
            answer=answers[str(q.question_id)],
        )
        for q in questions
    ]


def judge_all(items: Sequence[JudgeInput], judge: Judge, runs: int = 1) -> list[dict]:
    """Review records for every item and run (run numbers from 0)."""
    if runs < 1:
        raise VituneError(f"--judge-runs must be at least 1, got {runs}")
    reviews: list[dict] = []
    for run in range(runs):
        for item, (text, error) in zip(items, judge.review(items, run), strict=True):
            record: dict = {
                "question_id": item.question_id,
                "category": item.category,
                "text": text or "",
                "score": parse_review(text) if text else None,
                "run": run,
                "judge": judge.name,
            }
            if error:
                record["error"] = error
            reviews.append(record)
    return reviews


class LLMJudge:
    """Any OpenAI-compatible chat model, through the data-generation engine (cache, retries,
    budget). Each run is its own cache namespace, so repeated runs sample the judge anew."""

    def __init__(self, config: Any, temperature: float = 0.2, max_tokens: int = 1024, progress: bool = True) -> None:
        self.config = config
        self.name = str(getattr(config, "model", "judge"))
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.progress = progress

    def review(self, items: Sequence[JudgeInput], run: int) -> list[tuple[str | None, str | None]]:
        return run_chat(
            self.config,
            [(f"{item.question_id}#run{run}", judge_messages(item)) for item in items],
            prompt_version=f"{JUDGE_PROMPT_VERSION}/run{run}",
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            progress=self.progress,
        )


def run_chat(
    config: Any,
    keyed_messages: Sequence[tuple[str, list[dict]]],
    prompt_version: str,
    temperature: float,
    max_tokens: int,
    progress: bool = True,
) -> list[tuple[str | None, str | None]]:
    """(text, error) per request through the data-generation engine, in request order."""
    from dataclasses import replace

    from vitune.datagen.engine import ChatRequest, run_chat_requests

    config = replace(config, prompt_version=prompt_version)
    requests = [ChatRequest(key, messages, temperature=temperature, max_tokens=max_tokens) for key, messages in keyed_messages]
    results = {r.key: r for r in run_chat_requests(requests, config, progress=progress)}
    out: list[tuple[str | None, str | None]] = []
    for key, _ in keyed_messages:
        result = results.get(key)
        if result is None:
            out.append((None, "not run (budget reached or interrupted)"))
        elif result.error:
            out.append((None, str(result.error)))
        else:
            out.append((result.text, None))
    return out


def make_references(
    questions: Sequence[BenchQuestion],
    contexts: Mapping[str, str],
    config: Any,
    temperature: float = 0.2,
    max_tokens: int = 1024,
    progress: bool = True,
    where: str = "llava-bench",
) -> tuple[list[dict], list[str]]:
    """Reference answers by a text-only teacher that sees the context (as the paper's text-only
    GPT-4 did). Returns the answer records and the errors (one per failed question)."""
    keyed = [(f"ref:{q.question_id}", reference_messages(context_for(q, contexts, where), q.text)) for q in questions]
    results = run_chat(config, keyed, REFERENCE_PROMPT_VERSION, temperature, max_tokens, progress)
    records, errors = [], []
    for q, (text, error) in zip(questions, results, strict=True):
        if text is None:
            errors.append(f"question {q.question_id!r}: {error}")
            continue
        records.append(
            {"question_id": q.question_id, "category": q.category, "text": text, "model_id": str(getattr(config, "model", ""))}
        )
    return records, errors


# --- parsing and scoring ----------------------------------------------------------------------


def _valid(pair: Iterable[float]) -> tuple[float, float] | None:
    a, b = pair
    if SCORE_MIN <= a <= SCORE_MAX and SCORE_MIN <= b <= SCORE_MAX:
        return (a, b)
    return None


def parse_review(text: str) -> tuple[float, float] | None:
    """The (reference, model) scores of a judge reply, or None when they cannot be read.

    Read, in order: scores labelled "Assistant 1: 8 ... Assistant 2: 9" anywhere in the reply;
    exactly two numbers on the first non-empty line ("8 9", "8, 9", "8/10 9/10", "(8, 9)").
    Scores outside 0-10 are unreadable.
    """
    labelled = [_LABELLED[i].search(text) for i in (1, 2)]
    if labelled[0] and labelled[1]:
        return _valid(float(m.group(1)) for m in labelled)  # type: ignore[union-attr]
    first = next((line for line in text.splitlines() if line.strip()), "")
    first = re.sub(r"Assistant\s*\d", " ", first, flags=re.IGNORECASE)  # labels are not scores
    numbers = [float(m.group(1)) for m in _FIRST_LINE_NUMBER.finditer(first)]
    if len(numbers) == 2:
        return _valid(numbers)
    return None


def _category_stats(pairs: Sequence[tuple[float, float]]) -> dict:
    if not pairs:
        return {"reference": None, "model": None, "relative": None, "n": 0}
    ref = statistics.fmean(p[0] for p in pairs)
    model = statistics.fmean(p[1] for p in pairs)
    return {
        "reference": round(ref, 4),
        "model": round(model, 4),
        "relative": round(100.0 * model / ref, 2) if ref > 0 else None,
        "n": len(pairs),
    }


def score_run(reviews: Sequence[Mapping[str, Any]]) -> tuple[dict, int]:
    """Per-category statistics of one judge run (scores re-parsed from `text`), and the number
    of unparsed reviews."""
    by_cat: dict[str, list[tuple[float, float]]] = {c: [] for c in CATEGORIES}
    unparsed = 0
    for r in reviews:
        cat = r.get("category")
        if cat not in by_cat:
            raise VituneError(f"review of question {r.get('question_id')!r}: unknown category {cat!r}")
        pair = parse_review(str(r.get("text") or ""))
        if pair is None:
            unparsed += 1
        else:
            by_cat[cat].append(pair)
    categories = {c: _category_stats(by_cat[c]) for c in CATEGORIES}
    categories["all"] = _category_stats([p for c in CATEGORIES for p in by_cat[c]])
    return categories, unparsed


def score_reviews(reviews: Sequence[Mapping[str, Any]]) -> dict:
    """`{"categories": {cat|"all": {"reference", "model", "relative", "n"}}, "unparsed": N}`.

    With several runs (`run` field), each statistic is the mean over runs, `*_std` its sample
    standard deviation, `n` the reviews per run, `unparsed` the total, and `runs` each run's
    own table.
    """
    if not reviews:
        raise VituneError("no reviews to score")
    runs: dict[int, list[Mapping[str, Any]]] = {}
    for r in reviews:
        runs.setdefault(int(r.get("run", 0)), []).append(r)
    per_run = {k: score_run(v) for k, v in sorted(runs.items())}
    if len(per_run) == 1:
        categories, unparsed = next(iter(per_run.values()))
        return {"categories": categories, "unparsed": unparsed, "judge_runs": 1}
    categories = {}
    for cat in (*CATEGORIES, "all"):
        tables = [cats[cat] for cats, _ in per_run.values()]
        entry: dict[str, Any] = {"n": tables[0]["n"]}
        for key in ("reference", "model", "relative"):
            values = [t[key] for t in tables if t[key] is not None]
            entry[key] = round(statistics.fmean(values), 4 if key != "relative" else 2) if values else None
            entry[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
        categories[cat] = entry
    return {
        "categories": categories,
        "unparsed": sum(u for _, u in per_run.values()),
        "judge_runs": len(per_run),
        "runs": [{"run": k, "categories": cats, "unparsed": u} for k, (cats, u) in per_run.items()],
    }


def format_table(result: dict) -> str:
    multi = result.get("judge_runs", 1) > 1
    lines = [f"{'category':<9} {'relative':>14} {'reference':>10} {'model':>8} {'n':>5}"]
    for cat in (*CATEGORIES, "all"):
        e = result["categories"][cat]
        if e["relative"] is None:
            rel = "-"
        elif multi and e.get("relative_std") is not None:
            rel = f"{e['relative']:.1f} ± {e['relative_std']:.1f}"
        else:
            rel = f"{e['relative']:.1f}"
        ref = "-" if e["reference"] is None else f"{e['reference']:.2f}"
        mod = "-" if e["model"] is None else f"{e['model']:.2f}"
        lines.append(f"{cat:<9} {rel:>14} {ref:>10} {mod:>8} {e['n']:>5}")
    lines.append(f"unparsed reviews: {result['unparsed']}" + (f" (over {result['judge_runs']} runs)" if multi else ""))
    return "\n".join(lines)


def relative_score(reference: Sequence[float], model: Sequence[float]) -> float:
    """100 x mean(model) / mean(reference), the paper's relative score."""
    if not reference or len(reference) != len(model):
        raise VituneError("relative score needs equally many (non-zero) reference and model scores")
    ref = math.fsum(reference) / len(reference)
    if ref <= 0:
        raise VituneError("relative score is undefined when the mean reference score is 0")
    return 100.0 * (math.fsum(model) / len(model)) / ref


