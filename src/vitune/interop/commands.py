"""CLI: `vitune export` (to transformers' LLaVA layout) and `vitune import` (from it, or from the original release)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "export", help="write a vitune model in transformers' LLaVA layout (transformers, vLLM, SGLang)",
        description="Write a vitune model as a transformers LlavaForConditionalGeneration directory: config, "
        "safetensors weights, tokenizer, LlavaProcessor configs and a Jinja chat template equal to the model's "
        "own. Only the mlp2x_gelu projector exists in that layout.",
    )
    e.add_argument("--model", required=True, help="vitune model directory, or a LoRA adapter / LoRA run directory (merged first)")
    e.add_argument("--format", required=True, choices=("hf",), help="target layout: hf (transformers' LlavaForConditionalGeneration)")
    e.add_argument("--out", required=True, help="output directory (written atomically)")
    e.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size (default: 5)")
    e.set_defaults(func=_export)

    i = subparsers.add_parser(
        "import", help="convert a transformers LLaVA or original LLaVA checkpoint into a vitune model",
        description="hf: a transformers LlavaForConditionalGeneration directory. original: an LlavaLlamaForCausalLM "
        "checkpoint of the original release (mm_* config keys, model.mm_projector.* weights), or a stage-1 "
        "mm_projector.bin (with --base: loaded into that vitune model; without: written as a vitune projector "
        "checkpoint).",
    )
    i.add_argument("--format", required=True, choices=("hf", "original"), help="source layout")
    i.add_argument("--src", required=True, help="source checkpoint directory (or an mm_projector.bin file)")
    i.add_argument("--out", required=True, help="output vitune model (or projector) directory")
    i.add_argument("--template", default=None,
                   help="chat template name (default: hf: the one recorded by `vitune export`, else vicuna_v1; "
                   "original: vicuna_v1; projector with --base: the base's)")
    i.add_argument("--vision", default=None, help="original: vision tower path or hub id, instead of config.json's mm_vision_tower")
    i.add_argument("--base", default=None, help="original, mm_projector.bin only: vitune model to load the projector into")
    i.add_argument("--image-aspect-ratio", choices=("pad", "crop"), default=None,
                   help="hf: override (default: pad when the image processor pads, else crop)")
    i.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype to save (default auto: the checkpoint's own)")
    i.add_argument("--trust-remote-code", action="store_true", help="allow code from the hub in tokenizers/towers (off by default)")
    i.set_defaults(func=_import)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitune.interop.hf import adapter_dir, export_hf

    if adapter_dir(Path(args.model)) is not None:
        print(f"{args.model} is a LoRA adapter: merging it into its base model first (as `vitune merge-lora`)")
    out = export_hf(args.model, args.out, max_shard_size=int(args.max_shard_size_gb * 1024**3))
    print(f"exported {args.model} -> {out} (transformers LlavaForConditionalGeneration)")
    return 0


def _import(args: argparse.Namespace) -> int:
    from vitune.errors import VituneError

    if args.format == "hf":
        from vitune.interop.hf import import_hf

        if args.vision or args.base:
            raise VituneError("--vision and --base apply to --format original only")
        out = import_hf(args.src, args.out, template=args.template, image_aspect_ratio=args.image_aspect_ratio,
                        dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    else:
        from vitune.interop.original import import_original

        if args.image_aspect_ratio:
            raise VituneError("--image-aspect-ratio applies to --format hf only (original checkpoints say it in config.json)")
        out = import_original(args.src, args.out, template=args.template, vision=args.vision, base=args.base,
                              dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"imported {args.src} ({args.format}) -> {out}")
    return 0
