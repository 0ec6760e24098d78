"""The paper's ScienceQA ensemble: a judge model settles the questions where two models disagree.

Given the answers of model A (vitune) and model B (a second model, e.g. a text-only LLM), every
problem where their extracted letters differ (including one of them unreadable) goes to a judge
model (OpenAI-compatible, through the data-generation engine) that sees the question, the
context, the options and both answers with their reasoning, and ends its reply with "The answer
is X.". Where they agree, that answer stands.

Fallbacks, in order, when the judge's reply has no readable answer (or the request failed):
A's letter if A's answer was readable, else B's letter, else the problem counts as unanswered.
(The paper's "GPT-4 complement" rule, B where readable else A, is reported beside it.)

The report gives the accuracy and ScienceQA breakdown of A, B, the ensemble and the complement,
the upper bound (A or B right), and the counts of agreements, judge calls and fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from vitune.eval.llava_bench import prompt_text
from vitune.eval.scienceqa import (
    Problem,
    choice_text,
    context_text,
    extract_answer,
    score_scienceqa,
)

ENSEMBLE_PROMPT_VERSION = "vitune-scienceqa-ensemble/v1"

JudgeFn = Callable[[Sequence[tuple[str, list[dict]]]], list[tuple[str | None, str | None]]]


@dataclass(frozen=True)
class Decision:
    pid: str
    a: str | None  # letters as extracted
    b: str | None
    final: str | None
    source: str  # "agree" | "judge" | "fallback-a" | "fallback-b" | "none"
    judge_text: str | None = None


def ensemble_messages(problem: Problem, reply_a: str, reply_b: str) -> list[dict]:
    content = (
        f"Question: {problem.question.strip()}\n"
        f"Context: {context_text(problem)}\n"
        f"Options: {choice_text(problem)}\n\n"
        f"[Student 1]\n{reply_a.strip() or '(no answer)'}\n[End of Student 1]\n\n"
        f"[Student 2]\n{reply_b.strip() or '(no answer)'}\n[End of Student 2]\n\n"
        f"{prompt_text('ensemble_judge')}"
    )
    return [{"role": "user", "content": content}]


def decide(a: str | None, b: str | None, judge_reply: str | None, n_choices: int) -> tuple[str | None, str]:
    """(final letter, source) for one problem: the documented rule, as a pure function."""
    if a == b:
        return a, "agree" if a is not None else "none"
    judged = extract_answer(judge_reply, n_choices) if judge_reply else None
    if judged is not None:
        return judged, "judge"
    if a is not None:
        return a, "fallback-a"
    if b is not None:
        return b, "fallback-b"
    return None, "none"


def run_ensemble(
    problems: Sequence[Problem],
    answers_a: Mapping[str, str],
    answers_b: Mapping[str, str],
    judge: JudgeFn,
) -> tuple[list[Decision], dict]:
    """Decisions per problem and the report. `judge` gets (key, messages) pairs for the
    disagreements only and returns (text, error) per pair, in order."""
    letters = {
        p.pid: (
            extract_answer(answers_a[p.pid], len(p.choices)) if p.pid in answers_a else None,
            extract_answer(answers_b[p.pid], len(p.choices)) if p.pid in answers_b else None,
        )
        for p in problems
    }
    disputed = [p for p in problems if letters[p.pid][0] != letters[p.pid][1]]
    replies = judge(
        [(f"ensemble:{p.pid}", ensemble_messages(p, answers_a.get(p.pid, ""), answers_b.get(p.pid, ""))) for p in disputed]
    )
    judge_text = {p.pid: text for p, (text, _) in zip(disputed, replies, strict=True)}
    judge_errors = sum(1 for _, err in replies if err)
    decisions = []
    for p in problems:
        a, b = letters[p.pid]
        final, source = decide(a, b, judge_text.get(p.pid), len(p.choices))
        decisions.append(Decision(p.pid, a, b, final, source, judge_text.get(p.pid)))
    return decisions, ensemble_report(problems, answers_a, answers_b, decisions, judge_errors)


def _as_answers(letters: Mapping[str, str | None]) -> dict[str, str]:
    return {pid: (f"The answer is {x}." if x else "") for pid, x in letters.items()}


def _summary(result: dict) -> dict:
    summary = {k: result[k] for k in ("accuracy", "correct", "n", "by_category")}
    summary["unparsed"] = len(result["unparsed"])
    summary["missing"] = len(result["missing"])
    return summary


def ensemble_report(
    problems: Sequence[Problem],
    answers_a: Mapping[str, str],
    answers_b: Mapping[str, str],
    decisions: Sequence[Decision],
    judge_errors: int = 0,
) -> dict:
    by_pid = {d.pid: d for d in decisions}
    complement = {p.pid: (by_pid[p.pid].b or by_pid[p.pid].a) for p in problems}
    either = sum(1 for p in problems if p.answer_letter in (by_pid[p.pid].a, by_pid[p.pid].b))
    sources: dict[str, int] = {}
    for d in decisions:
        sources[d.source] = sources.get(d.source, 0) + 1
    return {
        "a": _summary(score_scienceqa(problems, answers_a)),
        "b": _summary(score_scienceqa(problems, answers_b)),
        "ensemble": _summary(score_scienceqa(problems, _as_answers({d.pid: d.final for d in decisions}))),
        "complement": _summary(score_scienceqa(problems, _as_answers(complement))),
        "upper_bound": round(100.0 * either / len(problems), 2),
        "n": len(problems),
        "disagreements": sum(1 for d in decisions if d.a != d.b),
        "sources": sources,
        "judge_errors": judge_errors,
        "decisions": [asdict(d) for d in decisions],
    }


def format_table(report: dict, names: tuple[str, str] = ("A", "B")) -> str:
    rows = [
        (names[0], report["a"]),
        (names[1], report["b"]),
        ("ensemble (judge)", report["ensemble"]),
        ("complement (B, else A)", report["complement"]),
    ]
    lines = [f"{'':<24} {'accuracy':>9}"]
    lines += [f"{name:<24} {r['accuracy']:>8.2f}%" for name, r in rows]
    lines.append(f"{'upper bound (A or B)':<24} {report['upper_bound']:>8.2f}%")
    lines.append(
        f"{report['disagreements']} of {report['n']} disputed; decided by: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["sources"].items()))
    )
    return "\n".join(lines)
