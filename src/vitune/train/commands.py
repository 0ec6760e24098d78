"""CLI: `vitune train PRESET [key=value ...]` (stage 1 or 2, by preset), `vitune merge-lora` and
`vitune export-checkpoint`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LLaVA model: stage 1 (pretrain) or stage 2 (finetune, LoRA) by preset",
        description="Train from a preset (a name from --list-presets or a YAML file) with key=value overrides, "
                    "e.g. `vitune train world-stage2 model.path=runs/m train.max_steps=100 stage.parts.llm=frozen`. "
                    "Distributed: `accelerate launch --config_file src/vitune/train/accelerate/ddp.yaml -m vitune.cli train ...`.",
    )
    p.add_argument("preset", nargs="?", help="preset name or YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    p.add_argument("--list-presets", action="store_true", help="list the bundled presets and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue train.output_dir's run from its last checkpoint (or the one given)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default=None,
                   help="stop at the first bad record (error) or quarantine it and go on (skip); sets data.on_bad_record")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--check-data", nargs="?", const="", default=None, metavar="QUARANTINE",
                   help="only validate and tokenize the data (no training): print the report, write skipped "
                        "records to QUARANTINE (with --on-bad-record skip)")
    p.set_defaults(func=_train)

    m = subparsers.add_parser("merge-lora", help="merge a LoRA adapter into its base model: a full model directory")
    m.add_argument("--adapter", required=True, help="LoRA directory (adapter_config.json) or a LoRA run directory")
    m.add_argument("--base", default=None, help="base model directory (default: the one the run recorded)")
    m.add_argument("--projector", default=None, help="projector directory (default: the run's projector/)")
    m.add_argument("--out", required=True, help="output model directory")
    m.set_defaults(func=_merge)

    c = subparsers.add_parser(
        "export-checkpoint", help="write a training checkpoint as a model directory (to evaluate or chat with any step)",
        description="Checkpoints (RUN/checkpoints/step-NNNNNN, every train.save_every steps) hold the trainable weights "
                    "only; this completes them with the model the run's config.yaml names and writes OUT/model "
                    "(LoRA merged), plus OUT/projector and OUT/lora where the run trains them, as the run writes at its end.",
    )
    c.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its last checkpoint)")
    c.add_argument("--out", required=True, help="output directory (OUT/model is the model)")
    c.set_defaults(func=_export_checkpoint)


def _train(args: argparse.Namespace) -> int:
    from vitune.errors import VituneError
    from vitune.train.config import list_presets, load_config, preset_path

    if args.list_presets:
        for name in list_presets():
            text = preset_path(name).read_text(encoding="utf-8")
            first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
            print(f"{name:28s} {first}")
        return 0
    if args.preset is None:
        raise VituneError("give a preset (see `vitune train --list-presets`) or a YAML file")
    overrides = list(args.overrides)
    if "=" in args.preset:
        raise VituneError(f"the first argument must be a preset or YAML file, got the override {args.preset!r}")
    if args.on_bad_record is not None:
        overrides.append(f"data.on_bad_record={args.on_bad_record}")
    config = load_config(args.preset, overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.check_data is not None:
        import json

        from vitune.train.trainer import check_data

        report = check_data(config, quarantine=args.check_data or None)
        print(json.dumps(report, indent=2))
        return 0
    from vitune.train.trainer import run_training

    run_training(config, resume=args.resume or False)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from vitune.train.lora import merge_lora

    out = merge_lora(args.base, args.adapter, args.out, projector=args.projector)
    print(f"merged model written to {out}")
    return 0


def _export_checkpoint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitune.train.trainer import export_checkpoint

    used = export_checkpoint(args.checkpoint, args.out)
    print(f"{used} written as a model to {Path(args.out) / 'model'}")
    return 0
