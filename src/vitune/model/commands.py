"""CLI: `vitune build` (a new LLaVA model from two backbones) and `vitune generate` (one answer)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="assemble a LLaVA model from a pretrained vision encoder and LLM")
    p.add_argument("--vision", required=True, help="vision encoder: local path or hub id (CLIP, SigLIP, ...)")
    p.add_argument("--llm", required=True, help="causal LM: local path or hub id (Llama/Vicuna, Mistral, Qwen2, ...)")
    p.add_argument("--projector", default="mlp2x_gelu", help="linear | mlp{N}x_gelu | identity (default: mlp2x_gelu)")
    p.add_argument("--template", default="vicuna_v1", help="chat template name (default: vicuna_v1)")
    p.add_argument("--feature-layer", default="-2", help="vision layer(s) to take, e.g. -2 or -2,-5 (default: -2)")
    p.add_argument("--feature-select", choices=("patch", "cls_patch"), default="patch")
    p.add_argument("--image-aspect-ratio", choices=("pad", "crop"), default="pad")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation")
    p.add_argument("--trust-remote-code", action="store_true", help="allow backbones' own code from the hub (off by default)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=_build)

    g = subparsers.add_parser("generate", help="answer one prompt about an image")
    g.add_argument("--model", required=True, help="vitune model directory")
    g.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    g.add_argument("--compile-decode", action="store_true", help="compile small models' decode step ahead of time (AOTInductor; one compile per batch and cache size, cached on disk): about 2x the tokens/s of op-bound models such as the demo's")
    g.add_argument("--json", action="store_true", help="print {prompt_ids, output_ids, text} as one JSON object")
    g.set_defaults(func=_generate)


def _feature_layer(text: str) -> int | list[int]:
    layers = [int(x) for x in text.split(",")]
    return layers[0] if len(layers) == 1 else layers


def _build(args: argparse.Namespace) -> int:
    from vitune.model.build import build_llava

    model, processor = build_llava(
        args.vision, args.llm, projector=args.projector, template=args.template,
        vision_feature_layer=_feature_layer(args.feature_layer), vision_feature_select=args.feature_select,
        image_aspect_ratio=args.image_aspect_ratio, seed=args.seed, trust_remote_code=args.trust_remote_code,
    )
    model.save_pretrained(args.out, processor)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {args.out}: {n / 1e6:.2f}M parameters, {model.config.num_image_tokens} image tokens, "
          f"projector {model.config.projector}, template {model.config.template}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from vitune.images import load_image
    from vitune.inference import GenerationRequest, Pipeline, SamplingParams

    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, compile_decode=args.compile_decode)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))
    request = GenerationRequest([{"role": "user", "content": args.prompt}], [load_image(p) for p in args.image], params)
    if args.json:
        out = pipe.generate([request])[0]
        print(json.dumps({"prompt_ids": out.prompt_ids, "output_ids": out.output_ids, "text": out.text, "finish_reason": out.finish_reason}))
        return 0
    for piece in pipe.stream(request):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
