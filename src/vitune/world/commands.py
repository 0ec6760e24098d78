"""`vitune world render`, `vitune world backbones`, `vitune world binding`: the synthetic world's command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="render the synthetic world and make its stand-in backbones")
    sub = world.add_subparsers(dest="world_command", metavar="STEP", required=True)

    render = sub.add_parser("render", help="render scenes: W/images/*.png and W/{train,val,test}.jsonl")
    render.add_argument("--out", type=Path, required=True, help="world directory to write")
    render.add_argument("--scenes", type=int, default=10000, help="training scenes (default 10000)")
    render.add_argument("--eval-scenes", type=int, default=1000, help="scenes in each of val and test (default 1000)")
    render.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    render.add_argument("--size", type=int, default=48, help="image side in pixels (default 48)")
    render.set_defaults(func=_render)

    backbones = sub.add_parser(
        "backbones", help="train a tokenizer, a CLIP (B/clip) and a Llama LM (B/lm) on a rendered world"
    )
    backbones.add_argument("--world", type=Path, required=True, help="world directory from `vitune world render`")
    backbones.add_argument("--out", type=Path, required=True, help="backbones directory to write")
    backbones.add_argument("--preset", default="tiny", help="model sizes and schedule: quick, tiny or small (default tiny)")
    backbones.add_argument(
        "--seconds", type=float, default=None, help="total time budget, split across the steps (default: the preset's)"
    )
    backbones.add_argument(
        "--steps", default=None, metavar="PHASE=N,...",
        help="fixed optimizer steps instead of time for some phases, e.g. clip=1200,lm=1000,chat=200 "
        "(the same backbones on any machine; phases not named keep their share of --seconds)",
    )
    backbones.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    backbones.set_defaults(func=_backbones)

    binding = sub.add_parser(
        "binding", help="where a trained model's attention goes when it answers about one object among several"
    )
    binding.add_argument("--model", type=Path, required=True, help="a trained model directory (e.g. runs/demo/stage2/model)")
    binding.add_argument("--world", type=Path, required=True, help="the world it was trained on")
    binding.add_argument("--split", default="test", help="scenes to ask about (default test)")
    binding.add_argument("--scenes", type=int, default=150, help="how many of them (default 150)")
    binding.set_defaults(func=_binding)


def _render(args: argparse.Namespace) -> int:
    from vitune.world.render import render_world

    render_world(args.out, scenes=args.scenes, eval_scenes=args.eval_scenes, seed=args.seed, size=args.size)
    print(f"world written to {args.out}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from vitune.world.backbones import make_backbones, parse_steps

    report = make_backbones(args.world, args.out, preset=args.preset, seconds=args.seconds, seed=args.seed, steps=parse_steps(args.steps))
    print(json.dumps(report, indent=2))
    return 0


def _binding(args: argparse.Namespace) -> int:
    from vitune.world.binding import binding_attention

    print(json.dumps(binding_attention(args.model, args.world, args.split, args.scenes), indent=2))
    return 0
