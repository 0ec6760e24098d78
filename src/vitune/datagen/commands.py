"""`vitune datagen {context,captions,instruct}`: the data generation commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vitune.errors import VituneError

DEFAULT_CACHE = Path(os.environ.get("VITUNE_CACHE_DIR", Path.home() / ".cache" / "vitune")) / "teacher"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("datagen", help="generate instruction data with a language-only teacher")
    sub = parser.add_subparsers(dest="datagen_command", metavar="SUBCOMMAND", required=True)

    ctx = sub.add_parser("context", help="COCO caption/instance files -> annotations JSONL")
    ctx.add_argument("--coco-captions", type=Path, required=True, help="captions_{train,val}20xx.json")
    ctx.add_argument("--coco-instances", type=Path, help="instances_{train,val}20xx.json (object boxes)")
    ctx.add_argument("--out", type=Path, required=True, help="annotations JSONL to write")
    ctx.add_argument("--image-prefix", default="", help="prepended to file names, e.g. 'train2017/'")
    ctx.set_defaults(func=cmd_context)

    cap = sub.add_parser("captions", help="image-caption pairs -> stage-1 'describe briefly' samples")
    src = cap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="JSONL ({image, caption} or {image, captions}) or CSV (image, caption columns)")
    src.add_argument("--coco-captions", type=Path, help="a COCO captions file")
    cap.add_argument("--out", type=Path, required=True, help="LLaVA JSON (.json) or JSONL (.jsonl) to write")
    cap.add_argument("--image-prefix", default="", help="COCO: prepended to file names")
    cap.add_argument("--image-column", default="image")
    cap.add_argument("--caption-column", default="caption")
    cap.add_argument("--all-captions", action="store_true", help="one sample per caption, not one per image")
    cap.add_argument("--filter", action="store_true", help="LLaVA's concept-coverage filter (noun phrases)")
    cap.add_argument("--min-count", type=int, default=3, help="filter: drop noun phrases seen fewer times (default 3)")
    cap.add_argument("--max-per-phrase", type=int, default=100, help="filter: captions kept per noun phrase (default 100)")
    cap.add_argument("--image-position", choices=("first", "last", "random"), default="first",
                     help="where <image> goes in the instruction (default first)")
    cap.add_argument("--prompt-version", default=None, help="brief instruction list version (default: latest)")
    cap.add_argument("--seed", type=int, default=0)
    cap.set_defaults(func=cmd_captions)

    ins = sub.add_parser("instruct", help="annotations -> conversation/detail/complex instruction data")
    ins.add_argument("--annotations", type=Path, required=True, help="annotations JSONL")
    ins.add_argument("--kinds", default="conversation,detail,complex", help="comma-separated kinds (default all three)")
    ins.add_argument("--teacher", required=True, help="openai (any OpenAI-compatible endpoint) or rules (offline)")
    ins.add_argument("--out", type=Path, required=True, help="LLaVA JSON (.json) or JSONL (.jsonl) to write")
    ins.add_argument("--mix", default=None, help="counts per kind, e.g. conversation=1000,detail=300,complex=500: distinct scenes drawn per kind, shuffled (replaces --kinds)")
    ins.add_argument("--seed", type=int, default=0, help="seed for --mix, instructions and the rules teacher (default 0)")
    ins.add_argument("--limit", type=int, default=None, help="use only the first N scenes")
    ins.add_argument("--quarantine", type=Path, default=None, help="rejected responses (default OUT.quarantine.jsonl)")
    ins.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON here")
    ins.add_argument("--prompt-version", default=None, help="prompt version, e.g. v1 (default: latest)")
    ins.add_argument("--no-attributes", action="store_true", help="context lines without colour/size (the paper's COCO format)")
    ins.add_argument("--no-progress", action="store_true")
    api = ins.add_argument_group("openai teacher")
    api.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api.add_argument("--model", default="gpt-4o", help="teacher model (default gpt-4o)")
    api.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    api.add_argument("--temperature", type=float, default=0.2)
    api.add_argument("--max-tokens", type=int, default=1024)
    api.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    api.add_argument("--rpm", type=int, default=None, help="requests per minute limit")
    api.add_argument("--tpm", type=int, default=None, help="tokens per minute limit")
    api.add_argument("--max-retries", type=int, default=6)
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    api.add_argument("--price-input", type=float, default=None, help="USD per 1M input tokens")
    api.add_argument("--price-output", type=float, default=None, help="USD per 1M output tokens")
    api.add_argument("--max-cost", type=float, default=None, help="stop before spending more than this (USD)")
    api.add_argument("--dry-run", action="store_true", help="estimate tokens and cost, send nothing")
    api.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"response cache (default {DEFAULT_CACHE})")
    api.add_argument("--batch-write", type=Path, default=None, help="write the Batch API input JSONL of uncached requests and stop")
    api.add_argument("--batch-ingest", type=Path, default=None,
                     help="ingest a Batch API output JSONL, then build the data set from the cache (sends nothing)")
    ins.set_defaults(func=cmd_instruct)


def cmd_context(args: argparse.Namespace) -> int:
    from vitune.datagen.context import coco_to_annotations, load_json
    from vitune.io import atomic_write_jsonl

    captions = load_json(args.coco_captions, "COCO captions")
    instances = load_json(args.coco_instances, "COCO instances") if args.coco_instances else None
    records = coco_to_annotations(captions, instances, args.image_prefix, str(args.coco_captions), str(args.coco_instances))
    n = atomic_write_jsonl(args.out, records)
    boxes = sum(len(r["instances"]) for r in records)
    print(f"wrote {n} images ({boxes} objects) to {args.out}")
    return 0


def cmd_captions(args: argparse.Namespace) -> int:
    from vitune.datagen.captions import caption_samples, coco_pairs, concept_filter, read_pairs
    from vitune.datagen.instruct import write_samples

    if args.coco_captions:
        pairs = coco_pairs(args.coco_captions, args.image_prefix, args.all_captions, args.seed)
    else:
        pairs = read_pairs(args.input, args.image_column, args.caption_column, args.all_captions, args.seed)
    if args.filter:
        keep, report = concept_filter([p.caption for p in pairs], args.min_count, args.max_per_phrase, args.seed)
        pairs = [pairs[i] for i in keep]
        print(f"concept filter: {report.kept}/{report.captions} captions kept; {report.phrases} noun phrases, "
              f"{report.rare_phrases} rare (< {args.min_count}) skipped, {report.capped_phrases} capped at {args.max_per_phrase}")
    samples = caption_samples(pairs, args.seed, args.prompt_version, args.image_position)
    write_samples(args.out, samples)
    print(f"wrote {len(samples)} samples to {args.out}")
    return 0


def engine_config(args: argparse.Namespace, cache_dir: Path | None = None, offline: bool = False):  # -> EngineConfig
    """The engine's settings from the shared API flags (datagen, and eval's judge and references).
    Prices are USD per 1M tokens on the command line, per 1K in the engine."""
    from vitune.datagen.engine import EngineConfig

    if (args.price_input is None) != (args.price_output is None):
        raise VituneError("give both --price-input and --price-output (USD per 1M tokens)")
    if args.max_cost is not None and args.price_input is None:
        raise VituneError("--max-cost needs --price-input and --price-output (USD per 1M tokens)")
    return EngineConfig(
        base_url=args.base_url,
        model=args.model,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        max_retries=args.max_retries,
        timeout_s=args.timeout,
        cache_dir=cache_dir if cache_dir is not None else args.cache_dir,
        price_per_1k_input=None if args.price_input is None else args.price_input / 1000,
        price_per_1k_output=None if args.price_output is None else args.price_output / 1000,
        max_cost=args.max_cost,
        offline=offline,
    )


def cmd_instruct(args: argparse.Namespace) -> int:
    from vitune.datagen.batch import ingest_batch_output, write_batch_input
    from vitune.datagen.engine import estimate_requests
    from vitune.datagen.instruct import generate_dataset, parse_kinds, parse_mix, plan_jobs
    from vitune.datagen.teachers import OpenAITeacher, TeacherOptions, get_teacher
    from vitune.world.scene import read_scenes

    if not args.annotations.exists():
        raise VituneError(f"annotations file not found: {args.annotations}")
    kinds = parse_kinds(args.kinds)
    mix = parse_mix(args.mix) if args.mix else None
    scenes = []
    for scene in read_scenes(args.annotations):
        if args.limit is not None and len(scenes) >= args.limit:
            break
        scenes.append(scene)
    jobs = plan_jobs(scenes, kinds, mix, args.seed)
    options = TeacherOptions(
        seed=args.seed,
        prompt_version=args.prompt_version,
        engine=engine_config(args, offline=args.batch_ingest is not None),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        attributes=not args.no_attributes,
        progress=not args.no_progress,
    )
    teacher = get_teacher(args.teacher, options)

    if isinstance(teacher, OpenAITeacher):
        requests = teacher.requests(jobs)
        if args.dry_run:
            est = estimate_requests(requests, options.engine)
            print(f"dry run: {len(jobs)} jobs, {est.requests} distinct requests, {est.cached} cached, "
                  f"{est.requests - est.cached} to send")
            print(f"estimated input tokens {est.prompt_tokens}, output tokens at most {est.max_completion_tokens}")
            if est.cost_min is not None:
                print(f"estimated cost ${est.cost_min:.4f} (input only) to ${est.cost_max:.4f} (every answer at max tokens)")
            else:
                print("no prices given (--price-input/--price-output, USD per 1M tokens): cost not estimated")
            return 0
        if args.batch_write:
            n = write_batch_input(requests, options.engine, args.batch_write)
            print(f"wrote {n} batch requests to {args.batch_write} (cached ones left out); submit it with the Batch API,\n"
                  f"then rerun with --batch-ingest OUTPUT.jsonl to build {args.out}")
            return 0
        if args.batch_ingest:
            report = ingest_batch_output(args.batch_ingest, requests, options.engine)
            print(f"batch ingest: stored {report.stored}, errors {dict(report.errors)}, unknown ids {len(report.unknown_ids)}, "
                  f"still missing {len(report.missing)}, cost ${report.cost:.4f}")
    elif args.dry_run or args.batch_write or args.batch_ingest:
        raise VituneError(f"--dry-run/--batch-write/--batch-ingest apply to the openai teacher, not {args.teacher!r}")

    quarantine = args.quarantine or args.out.with_name(args.out.stem + ".quarantine.jsonl")
    _, summary = generate_dataset(teacher, jobs, args.out, quarantine)
    print(summary.text())
    print(f"wrote {summary.written} samples to {args.out}" + (f"; quarantine: {quarantine}" if sum(summary.quarantined.values()) else ""))
    if args.summary:
        from vitune.io import atomic_write_json

        atomic_write_json(args.summary, summary.to_json(), indent=1)
    if summary.engine.get("skipped_budget"):
        print(f"stopped at the budget (--max-cost {args.max_cost}); rerun with a higher one to finish "
              "(answers so far are cached)", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vitune.datagen ...`: the datagen commands alone, as `vitune datagen ...` runs them."""
    parser = argparse.ArgumentParser(prog="python -m vitune.datagen")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(subparsers)
    args = parser.parse_args(["datagen", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except VituneError as err:
        print(f"vitune datagen: error: {err}", file=sys.stderr)
        return 2
