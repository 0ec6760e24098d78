"""`vitune eval ...`: the evaluation command line (answer, merge, score, judge, reference,
ensemble, scienceqa-to-llava, toy, tasks). Heavy imports stay inside the command functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitune.errors import VituneError
from vitune.eval.tasks import TASKS, add_engine_args, engine_config, get_task


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="evaluate: ScienceQA, LLaVA-Bench (LLM judge), synthetic-world tasks",
        description="Two phases: `answer` runs a model and logs answers (resumable, shardable); "
        "`score` turns answers (or judge reviews) into a result JSON and a table.",
    )
    sub = ev.add_subparsers(dest="eval_command", metavar="STEP", required=True)

    answer = sub.add_parser("answer", help="phase 1: answer a task's questions into a JSONL log")
    answer_tasks = answer.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        task = TASKS.get(name)
        p = answer_tasks.add_parser(name, help=task.summary, description=task.summary)
        task.add_answer_args(p)
        _model_args(p)
        p.set_defaults(func=_answer)

    score = sub.add_parser("score", help="phase 2: score answers (or reviews), print a table, write JSON")
    score_tasks = score.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        task = TASKS.get(name)
        p = score_tasks.add_parser(name, help=task.summary, description=task.summary)
        task.add_score_args(p)
        p.set_defaults(func=_score)

    merge = sub.add_parser("merge", help="join shard answer logs (first answer per question_id wins)")
    merge.add_argument("inputs", nargs="+", type=Path, help="answers JSONL files, e.g. answers.*.jsonl")
    merge.add_argument("--out", type=Path, required=True)
    merge.set_defaults(func=_merge)

    judge = sub.add_parser("judge", help="LLaVA-Bench judging: reviews JSONL (question_id, category, text, score)")
    judge_tasks = judge.add_subparsers(dest="task", metavar="TASK", required=True)
    jb = judge_tasks.add_parser("llava-bench", help="judge answers against references with an OpenAI-compatible model")
    _bench_files(jb)
    jb.add_argument("--references", type=Path, required=True, help="reference answers JSONL (question_id, text)")
    jb.add_argument("--answers", type=Path, required=True, help="the model's answers JSONL")
    jb.add_argument("--out", type=Path, required=True, help="reviews JSONL to write")
    jb.add_argument("--judge-runs", type=int, default=1, help="judge K times (mean and std over runs)")
    add_engine_args(jb)
    jb.set_defaults(func=_judge_bench)
    jt = judge_tasks.add_parser("toy-bench", help="judge toy-bench answers (rules judge or OpenAI-compatible)")
    jt.add_argument("--world", type=Path, required=True)
    jt.add_argument("--split", default="test")
    jt.add_argument("--scenes", type=int, default=None)
    jt.add_argument("--seed", type=int, default=0)
    jt.add_argument("--answers", type=Path, required=True)
    jt.add_argument("--out", type=Path, required=True, help="reviews JSONL to write")
    jt.add_argument("--judge", choices=("rules", "openai"), default="rules")
    jt.add_argument("--judge-runs", type=int, default=1)
    add_engine_args(jt)
    jt.set_defaults(func=_judge_toy)

    ref = sub.add_parser("reference", help="reference answers from a text-only teacher that sees the context")
    _bench_files(ref)
    ref.add_argument("--out", type=Path, required=True, help="reference answers JSONL to write")
    add_engine_args(ref, what="teacher")
    ref.set_defaults(func=_reference)

    ens = sub.add_parser("ensemble", help="ScienceQA: a judge model settles where two models disagree")
    ens.add_argument("--data", type=Path, required=True, help="ScienceQA release folder")
    ens.add_argument("--split", default="test")
    ens.add_argument("--answers", type=Path, required=True, help="answers of model A (vitune)")
    ens.add_argument("--second", type=Path, required=True, help="answers of model B")
    ens.add_argument("--names", default="vitune,second", help="display names of A and B (default vitune,second)")
    ens.add_argument("--out", type=Path, required=True, help="report JSON to write")
    ens.add_argument("--ensemble-answers", type=Path, default=None, help="also write the ensemble's answers JSONL")
    add_engine_args(ens)
    ens.set_defaults(func=_ensemble)

    conv = sub.add_parser("scienceqa-to-llava", help="a ScienceQA split as LLaVA conversations for fine-tuning")
    conv.add_argument("--data", type=Path, required=True, help="ScienceQA release folder")
    conv.add_argument("--split", default="train")
    conv.add_argument("--format", dest="prompt_format", choices=("CQM-A", "QCM-LEA"), default="QCM-LEA")
    conv.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=False,
                      help="ask for the letter directly (the target is then the bare letter)")  # fmt: skip
    conv.add_argument("--out", type=Path, required=True, help="LLaVA JSON to write")
    conv.set_defaults(func=_to_llava)

    toy = sub.add_parser("toy", help="answer and score a synthetic-world task in one go")
    toy.add_argument("task", choices=("toy-vqa", "toy-scienceqa", "toy-bench"))
    toy.add_argument("--world", type=Path, required=True)
    toy.add_argument("--model", type=Path, required=True, help="vitune model directory")
    toy.add_argument("--out-dir", type=Path, required=True, help="writes TASK.answers.jsonl and TASK.json there")
    toy.add_argument("--scenes", type=int, default=None, help="first N held-out scenes (default all)")
    toy.add_argument("--seed", type=int, default=0,
                     help="question sampling seed (default 0; `vitune demo --seed N` asks with N)")
    toy.add_argument("--batch-size", type=int, default=8)
    toy.add_argument("--device", default="auto")
    toy.set_defaults(func=_toy)

    tasks = sub.add_parser("tasks", help="list the evaluation tasks")
    tasks.set_defaults(func=_list_tasks)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model", required=True, help="vitune model directory, or the model name with --endpoint")
    g.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the endpoint's API key")
    g.add_argument("--out", type=Path, required=True, help="answers JSONL (appended; a rerun skips answered ids)")
    g.add_argument("--shard", default="0/1", help="answer only slice i of n (i/n, default 0/1)")
    g.add_argument("--limit", type=int, default=None, help="first N questions only")
    g.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--concurrency", type=int, default=4, help="parallel requests with --endpoint (default 4)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request with --endpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=Path, required=True, help="questions JSONL (question_id, image, text, category)")
    p.add_argument("--contexts", type=Path, required=True, help="image contexts JSONL (captions + instances, or caption)")


def _answer(args: argparse.Namespace) -> int:
    from vitune.eval.answer import (
        EndpointAnswerer,
        PipelineAnswerer,
        answered_ids,
        parse_shard,
        run_answers,
        shard_items,
    )

    task = get_task(args.task)
    shard = parse_shard(args.shard)
    items = task.build_items(args)
    if args.limit is not None:
        items = items[: args.limit]
    done = answered_ids(args.out)
    todo = [i for i in shard_items(items, shard) if str(i.question_id) not in done]
    if not todo:
        print(f"{args.out}: all {len(shard_items(items, shard))} questions of shard {args.shard} already answered")
        return 0
    max_new = args.max_new_tokens or task.max_new_tokens(args)
    answerer: EndpointAnswerer | PipelineAnswerer
    if args.endpoint:
        answerer = EndpointAnswerer(
            args.endpoint, args.model, os.environ.get(args.api_key_env), max_tokens=max_new,
            temperature=args.temperature, top_p=args.top_p if args.top_p != 1.0 else None,
            concurrency=args.concurrency, timeout_s=args.timeout,
        )  # fmt: skip
    else:
        from vitune.inference import SamplingParams

        params = SamplingParams(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p, seed=args.sampling_seed)
        answerer = PipelineAnswerer.from_model_dir(args.model, params, args.batch_size, args.device, args.dtype)
    run = run_answers(items, answerer, args.out, shard, progress=not args.quiet)
    print(f"{args.out}: {run.written} answered, {run.skipped} already there, {len(run.failed)} failed (shard {args.shard}, {run.total} questions)")
    if run.failed:
        for line in run.failed[:5]:
            print(f"  failed: {line}", file=sys.stderr)
        print("rerun the same command to retry the failed questions", file=sys.stderr)
        return 1
    return 0


def _merge(args: argparse.Namespace) -> int:
    from vitune.eval.answer import merge_answers

    written, dups = merge_answers(args.inputs, args.out)
    print(f"{args.out}: {written} answers from {len(args.inputs)} file(s)" + (f", {dups} duplicate(s) dropped" if dups else ""))
    return 0


def _write_result(result: dict, out: Path, table: str) -> None:
    from vitune.io import atomic_write_json

    print(table)
    atomic_write_json(out, result)
    print(f"wrote {out}")


def _score(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    result = task.score(args)
    _write_result(result, args.out, task.format_table(result))
    return 0


def _judge_bench(args: argparse.Namespace) -> int:
    from vitune.eval.answer import load_answer_texts
    from vitune.eval.llava_bench import (
        LLMJudge,
        build_judge_inputs,
        judge_all,
        load_contexts,
        load_questions,
    )

    items = build_judge_inputs(
        load_questions(args.questions), load_contexts(args.contexts),
        load_answer_texts(args.references), load_answer_texts(args.answers), where=str(args.answers),
    )  # fmt: skip
    judge = LLMJudge(engine_config(args), args.judge_temperature, args.judge_max_tokens)
    return _write_reviews(judge_all(items, judge, args.judge_runs), args.out)


def _write_reviews(reviews: list[dict], out: Path) -> int:
    from vitune.io import atomic_write_jsonl
    from vitune.eval.llava_bench import format_table, score_reviews

    atomic_write_jsonl(out, reviews)
    errors = [r for r in reviews if r.get("error")]
    unparsed = sum(1 for r in reviews if r["score"] is None and not r.get("error"))
    print(f"{out}: {len(reviews)} reviews, {unparsed} unparsed, {len(errors)} failed")
    print(format_table(score_reviews(reviews)))
    if errors:
        print(f"  e.g. {errors[0]['question_id']}: {errors[0]['error']}; rerun to retry (answers already paid for are cached)", file=sys.stderr)
        return 1
    return 0


def _judge_toy(args: argparse.Namespace) -> int:
    from vitune.eval import toy
    from vitune.eval.answer import load_answer_texts
    from vitune.eval.llava_bench import judge_all

    judge = toy.make_judge(args.judge, engine_config(args) if args.judge == "openai" else None,
                           args.judge_temperature, args.judge_max_tokens)  # fmt: skip
    items = toy.bench_judge_inputs(args.world, load_answer_texts(args.answers), split=args.split, limit=args.scenes, seed=args.seed)
    return _write_reviews(judge_all(items, judge, args.judge_runs), args.out)


def _reference(args: argparse.Namespace) -> int:
    from vitune.io import atomic_write_jsonl
    from vitune.eval.llava_bench import load_contexts, load_questions, make_references

    records, errors = make_references(
        load_questions(args.questions), load_contexts(args.contexts), engine_config(args),
        temperature=args.judge_temperature, max_tokens=args.judge_max_tokens,
    )  # fmt: skip
    atomic_write_jsonl(args.out, records)
    print(f"{args.out}: {len(records)} reference answers, {len(errors)} failed")
    if errors:
        print(f"  e.g. {errors[0]}; rerun to retry (cached answers are not paid twice)", file=sys.stderr)
        return 1
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from vitune.eval.answer import load_answer_texts
    from vitune.eval.ensemble import ENSEMBLE_PROMPT_VERSION, format_table, run_ensemble
    from vitune.io import atomic_write_json, atomic_write_jsonl
    from vitune.eval.llava_bench import run_chat
    from vitune.eval.scienceqa import load_split

    names = tuple(args.names.split(","))
    if len(names) != 2:
        raise VituneError(f"--names needs two comma-separated names, got {args.names!r}")
    config = engine_config(args)

    def judge(keyed: list[tuple[str, list[dict]]]) -> list[tuple[str | None, str | None]]:
        return run_chat(config, keyed, ENSEMBLE_PROMPT_VERSION, args.judge_temperature, args.judge_max_tokens) if keyed else []

    problems = load_split(args.data, args.split)
    decisions, report = run_ensemble(problems, load_answer_texts(args.answers), load_answer_texts(args.second), judge)
    report["names"] = {"a": names[0], "b": names[1]}
    print(format_table(report, names))  # type: ignore[arg-type]
    atomic_write_json(args.out, report)
    if args.ensemble_answers:
        atomic_write_jsonl(args.ensemble_answers, [
            {"question_id": d.pid, "text": f"The answer is {d.final}." if d.final else "", "source": d.source}
            for d in decisions
        ])  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _to_llava(args: argparse.Namespace) -> int:
    from vitune.io import atomic_write_json
    from vitune.eval.scienceqa import load_split, to_llava

    records = to_llava(load_split(args.data, args.split), args.prompt_format, args.single_pred_prompt)
    atomic_write_json(args.out, records)
    with_image = sum(1 for r in records if "image" in r)
    print(f"{args.out}: {len(records)} conversations ({with_image} with an image); "
          f"train with image folder {args.data / 'images' / args.split}")  # fmt: skip
    return 0


def _toy(args: argparse.Namespace) -> int:
    from vitune.eval.toy import run_toy_task

    result = run_toy_task(args.task, args.world, args.model, args.out_dir, limit=args.scenes, seed=args.seed,
                          batch_size=args.batch_size, device=args.device)  # fmt: skip
    print(json.dumps({k: result[k] for k in ("accuracy", "chance", "by_type")}, indent=2))
    return 0


def _list_tasks(args: argparse.Namespace) -> int:
    for name in TASKS:
        print(f"{name:<14} {TASKS.get(name).summary}")
    return 0
