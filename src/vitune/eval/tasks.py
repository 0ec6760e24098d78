"""The evaluation task registry: one entry per task name, exact match, loud on unknown names.

A task knows its own command-line arguments, how to turn them into questions (`EvalItem`s, phase
1) and how to score (phase 2). `vitune eval answer TASK` and `vitune eval score TASK` are built
from this registry, so adding a task is one `Task(...)` here plus its module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitune.eval.answer import EvalItem, load_answer_texts
from vitune.eval.io import read_jsonl
from vitune.registry import Registry


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    add_answer_args: Callable[[argparse.ArgumentParser], None]
    build_items: Callable[[argparse.Namespace], list[EvalItem]]
    add_score_args: Callable[[argparse.ArgumentParser], None]
    score: Callable[[argparse.Namespace], dict]
    format_table: Callable[[dict], str]
    max_new_tokens: Callable[[argparse.Namespace], int]


TASKS: Registry[Task] = Registry("evaluation task")


def get_task(name: str) -> Task:
    return TASKS.get(name)


# --- shared arguments -------------------------------------------------------------------------


def add_engine_args(parser: argparse.ArgumentParser, what: str = "judge") -> None:
    """The OpenAI-compatible model behind the data-generation engine (cache, retries, budget)."""
    g = parser.add_argument_group(f"{what} model (OpenAI-compatible, via the data-generation engine)")
    g.add_argument("--base-url", default=None, help="chat-completions base URL (default: the openai client's, api.openai.com)")
    g.add_argument("--model", default="gpt-4o", help=f"{what} model name (default gpt-4o)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    g.add_argument("--rpm", type=int, default=None, help="requests-per-minute limit")
    g.add_argument("--tpm", type=int, default=None, help="tokens-per-minute limit")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--cache-dir", type=Path, default=None, help="response cache (default: .chat-cache beside --out)")
    g.add_argument("--max-cost", type=float, default=None, help="stop before spending more (USD; needs prices)")
    g.add_argument("--price-input", type=float, default=None, help="USD per 1M prompt tokens")
    g.add_argument("--price-output", type=float, default=None, help="USD per 1M completion tokens")
    g.add_argument("--judge-temperature", type=float, default=0.2, help=f"{what} sampling temperature (default 0.2)")
    g.add_argument("--judge-max-tokens", type=int, default=1024, help=f"{what} reply length limit (default 1024)")


def engine_config(args: argparse.Namespace) -> Any:
    """The judge's engine settings; the cache defaults to `.chat-cache` beside --out."""
    from vitune.datagen.commands import engine_config as shared

    cache = args.cache_dir if args.cache_dir is not None else Path(args.out).parent / ".chat-cache"
    return shared(args, cache_dir=cache)


def _answers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", type=Path, required=True, help="answers JSONL from `vitune eval answer`")
    p.add_argument("--out", type=Path, required=True, help="result JSON to write")


# --- scienceqa --------------------------------------------------------------------------------


def _sqa_data_args(p: argparse.ArgumentParser) -> None:
    from vitune.eval.scienceqa import PROMPT_FORMATS

    p.add_argument("--data", type=Path, required=True, help="ScienceQA release folder (problems.json, pid_splits.json, images/)")
    p.add_argument("--split", default="test", help="split of pid_splits.json (default test)")
    p.add_argument("--format", dest="prompt_format", choices=PROMPT_FORMATS, default="QCM-LEA",
                   help="prompt format (default QCM-LEA, the paper's)")  # fmt: skip
    p.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=False,
                   help="end the question with \"Answer with the option's letter from the given choices directly.\"")  # fmt: skip


def _sqa_items(args: argparse.Namespace) -> list[EvalItem]:
    from vitune.eval.scienceqa import build_prompt, image_path, load_split

    items = []
    for p in load_split(args.data, args.split):
        img = image_path(args.data, p, args.split)
        items.append(
            EvalItem(
                question_id=p.pid,
                prompt=build_prompt(p, args.prompt_format, args.single_pred_prompt),
                images=(img,) if img is not None else (),
                fields={"answer": p.answer_letter, "subject": p.subject, "grade": p.grade, "topic": p.topic},
            )
        )
    return items


def _sqa_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="ScienceQA release folder")
    p.add_argument("--split", default="test", help="split of pid_splits.json (default test)")
    _answers_arg(p)


def _sqa_score(args: argparse.Namespace) -> dict:
    from vitune.eval.scienceqa import load_split, score_scienceqa

    result = score_scienceqa(load_split(args.data, args.split), load_answer_texts(args.answers))
    return {"task": "scienceqa", "split": args.split, **result}


def _sqa_table(result: dict) -> str:
    from vitune.eval.scienceqa import format_table

    return format_table(result)


# --- llava-bench ------------------------------------------------------------------------------


def _bench_answer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=Path, required=True, help="questions JSONL (question_id, image, text, category)")
    p.add_argument("--images", type=Path, required=True, help="folder of the questions' images")


def _bench_items(args: argparse.Namespace) -> list[EvalItem]:
    from vitune.eval.llava_bench import load_questions

    return [
        EvalItem(
            question_id=q.question_id,
            prompt=f"<image>\n{q.text}",
            images=(args.images / q.image,),
            fields={"category": q.category, "image": q.image},
        )
        for q in load_questions(args.questions)
    ]


def _bench_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reviews", type=Path, required=True, help="reviews JSONL from `vitune eval judge`")
    p.add_argument("--out", type=Path, required=True, help="result JSON to write")


def _bench_score(args: argparse.Namespace) -> dict:
    from vitune.eval.llava_bench import score_reviews

    return score_reviews(read_jsonl(args.reviews))


def _bench_table(result: dict) -> str:
    from vitune.eval.llava_bench import format_table

    return format_table(result)


# --- synthetic world --------------------------------------------------------------------------


def _world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=Path, required=True, help="world directory from `vitune world render`")
    p.add_argument("--split", default="test", help="scene split (default test, held out)")
    p.add_argument("--scenes", type=int, default=None, help="first N scenes only (default all)")
    p.add_argument("--seed", type=int, default=0, help="question sampling seed (default 0)")


def _toy_sqa_args(p: argparse.ArgumentParser) -> None:
    _world_args(p)
    p.add_argument("--format", dest="prompt_format", choices=("CQM-A", "QCM-LEA"), default="CQM-A",
                   help="ScienceQA prompt format (default CQM-A)")  # fmt: skip
    p.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for the option's letter directly (default on)")  # fmt: skip


def _toy_bench_score_args(p: argparse.ArgumentParser) -> None:
    _world_args(p)
    _answers_arg(p)
    p.add_argument("--judge", choices=("rules", "openai"), default="rules",
                   help="rules: the offline rules judge (default); openai: an OpenAI-compatible judge")  # fmt: skip
    p.add_argument("--judge-runs", type=int, default=1, help="judge K times, report mean and std (default 1)")
    p.add_argument("--reviews-out", type=Path, default=None, help="reviews JSONL (default: beside --out)")
    add_engine_args(p)


def _toy_table(result: dict) -> str:
    lines = [f"{result['task']}: accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}, n={result['n']})"]
    for t, e in result["by_type"].items():
        lines.append(f"  {t:<10} {e['accuracy']:.3f}  (chance {e['chance']:.3f}, n={e['n']})")
    return "\n".join(lines)


def _toy_items(task: str) -> Callable[[argparse.Namespace], list[EvalItem]]:
    def build(args: argparse.Namespace) -> list[EvalItem]:
        from vitune.eval import toy

        return toy.task_items(task, args.world, split=args.split, limit=args.scenes, seed=args.seed,
                              fmt=getattr(args, "prompt_format", "CQM-A"),
                              single_pred_prompt=getattr(args, "single_pred_prompt", True))  # fmt: skip

    return build


def _toy_score(task: str) -> Callable[[argparse.Namespace], dict]:
    def score(args: argparse.Namespace) -> dict:
        from vitune.eval import toy

        answers = load_answer_texts(args.answers)
        if task != "toy-bench":
            return toy.score_task(task, args.world, answers, split=args.split, limit=args.scenes, seed=args.seed)
        judge: Any
        if args.judge == "rules":
            from vitune.eval.judge_rules import RulesJudge

            judge = RulesJudge()
        else:
            from vitune.eval.llava_bench import LLMJudge

            judge = LLMJudge(engine_config(args), args.judge_temperature, args.judge_max_tokens)
        reviews_out = args.reviews_out or args.out.with_name(args.out.stem + ".reviews.jsonl")
        return toy.score_bench(args.world, answers, judge, reviews_out, split=args.split, limit=args.scenes,
                               seed=args.seed, judge_runs=args.judge_runs)  # fmt: skip

    return score


def _register_all() -> None:
    TASKS.add("scienceqa", Task(
        "scienceqa", "ScienceQA multiple choice (official release folder)",
        _sqa_data_args, _sqa_items, _sqa_score_args, _sqa_score, _sqa_table,
        lambda a: 512 if a.prompt_format == "QCM-LEA" else 64,
    ))  # fmt: skip
    TASKS.add("llava-bench", Task(
        "llava-bench", "LLaVA-Bench questions (answers are judged by `vitune eval judge llava-bench`)",
        _bench_answer_args, _bench_items, _bench_score_args, _bench_score, _bench_table,
        lambda a: 512,
    ))  # fmt: skip
    TASKS.add("toy-vqa", Task(
        "toy-vqa", "synthetic world: short-answer questions by type, exact match vs chance",
        _world_args, _toy_items("toy-vqa"), lambda p: (_world_args(p), _answers_arg(p)), _toy_score("toy-vqa"),
        _toy_table, lambda a: 16,
    ))  # fmt: skip
    TASKS.add("toy-scienceqa", Task(
        "toy-scienceqa", "synthetic world: multiple choice in the ScienceQA schema",
        _toy_sqa_args, _toy_items("toy-scienceqa"), lambda p: (_world_args(p), _answers_arg(p)),
        _toy_score("toy-scienceqa"), _toy_table, lambda a: 512 if a.prompt_format == "QCM-LEA" else 16,
    ))  # fmt: skip
    TASKS.add("toy-bench", Task(
        "toy-bench", "synthetic world: conv/detail/complex questions judged against rules-teacher references",
        _world_args, _toy_items("toy-bench"), _toy_bench_score_args, _toy_score("toy-bench"), _toy_table,
        lambda a: 256,
    ))  # fmt: skip


_register_all()

