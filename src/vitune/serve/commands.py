"""CLI: `vitune chat` (terminal chat) and `vitune serve` (OpenAI-compatible API server + web demo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitune.errors import VituneError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def register(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser("chat", help="chat with a model about images in the terminal (or answer piped questions)",
                              description="Multi-turn chat; answers stream as they are generated. Commands: /image PATH, "
                                          "/reset, /save FILE, /help, /quit. With piped stdin, each line is one question "
                                          "(or command) and each answer is printed on its own line.")
    c.add_argument("--model", required=True, help="vitune model directory")
    c.add_argument("--image", default=None, help="image to ask about first")
    c.add_argument("--max-new-tokens", type=_positive_int, default=512)
    _sampling_flags(c, temperature=0.2)
    c.add_argument("--system", default=None, help="system message (default: the template's own)")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    c.add_argument("--compile-decode", action="store_true", help="compile small models' decode step ahead of time (AOTInductor; one compile per batch and cache size, cached on disk): about 2x the tokens/s of op-bound models such as the demo's")
    c.set_defaults(func=_chat)

    s = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible API, with a web demo at /",
                              description="POST /v1/chat/completions (OpenAI-compatible, streaming), GET /v1/models, "
                                          "GET /health, and a web demo at /. Requests arriving together are decoded in one batch.")
    s.add_argument("--model", required=True, help="vitune model directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(default: the VITUNE_API_KEY environment variable, else none)")
    s.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: the directory name)")
    s.add_argument("--max-request-bytes", type=_positive_int, default=20 * 1024 * 1024, help="largest request body (default: 20 MiB)")
    s.add_argument("--max-image-pixels", type=_positive_int, default=12_000_000, help="largest image, width x height (default: 12M)")
    s.add_argument("--max-images", type=_positive_int, default=8, help="most images in one request (default: 8)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=2048, help="largest max_tokens a request may ask for (default: 2048)")
    s.add_argument("--max-batch-size", type=_positive_int, default=8, help="most requests decoded together (default: 8)")
    s.add_argument("--max-queue", type=_positive_int, default=128, help="requests waiting beyond the running batch before 503 (default: 128)")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a new batch waits for more requests (default: 5)")
    s.add_argument("--max-connections", type=_positive_int, default=512, help="open connections before uvicorn answers 503 (default: 512)")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public addresses only; off by default)")
    s.add_argument("--no-web", action="store_true", help="serve the API only, without the web demo at /")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=_serve)


def _check_model_dir(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise VituneError(f"{path}: not a vitune model directory (no config.json)")


def _chat(args: argparse.Namespace) -> int:
    from vitune.inference import Pipeline, SamplingParams
    from vitune.serve.chat import ChatSession, run_chat

    _check_model_dir(args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, compile_decode=args.compile_decode)
    session = ChatSession(pipe, params, system=args.system)
    if args.image:
        session.set_image(args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  - line editing and history for input()
    return run_chat(session, sys.stdin, sys.stdout, sys.stderr, interactive)


def _serve(args: argparse.Namespace) -> int:
    import os

    from vitune.inference import Pipeline
    from vitune.serve.app import ServeConfig, create_app, run_server
    from vitune.serve.protocol import Limits

    _check_model_dir(args.model)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_new_tokens=args.max_new_tokens, allow_remote_images=args.allow_remote_images)
    api_key = args.api_key or os.environ.get("VITUNE_API_KEY") or None
    name = args.model_name or Path(args.model).resolve().name
    config = ServeConfig(model_name=name, api_key=api_key, limits=limits, max_batch_size=args.max_batch_size,
                         max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000, web=not args.no_web)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    app = create_app(pipe, config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    print(f"serving {name} on http://{args.host}:{args.port}  (API: /v1/chat/completions, web demo: "
          f"{'off' if args.no_web else '/'})", file=sys.stderr)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level, max_connections=args.max_connections)
    return 0
