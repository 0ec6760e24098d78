"""`make stress`: the long reliability checks, with their numbers in `runs/stress/results.json`.

    .venv/bin/python stress/run.py [--out runs/stress] [--clients 64] [--seconds 60] [--only load,bombs,kills]

- load: `vitune serve` (tiny model, its own process) on loopback; N concurrent streaming clients for
  S seconds, each asking again as soon as its answer ends; zero failed requests required; latency
  p50/p99 (request to `[DONE]`), time to first token, completion tokens per second.
- bombs: full-size attacks against the same server with its default limits: a 30000x30000 PNG
  bomb (a real zlib stream), 50 MB of base64, 1,000 images, a million-character prompt, deeply
  nested JSON, eight 10000x10 images; each answered as expected within seconds, with the server's
  peak RSS growth measured.
- kills: data generation and evaluation phase 1 SIGKILLed at random points several times in a row
  (exact paid-reply accounting, see tests/test_reliability_faults.py), and training SIGKILLed at
  three random steps, resumed each time, ending with weights equal to an uninterrupted run's.

Results: `{"load": {"clients", "seconds", "requests", "failed", ...}, "bombs": {...}, "kills": {...},
"passed": bool, "failures": [...]}`; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the corpus and the fault harness live with the tests
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
os.environ.update({k: ENV[k] for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})


def log(msg: str) -> None:
    print(f"[stress {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- the tiny model and its server ----------------------------------------------------------------
def tiny_model(work: Path) -> Path:
    from vitune.model.build import build_llava
    from vitune.testing import make_tiny_backbones

    out = work / "model" / "tiny"
    if not (out / "config.json").is_file():
        vision, llm = make_tiny_backbones(work / "backbones")
        model, processor = build_llava(str(vision), str(llm))
        model.save_pretrained(out, processor)
    return out


class ServerProcess:
    """`vitune serve` in a child process on a free loopback port."""

    def __init__(self, model: Path, *flags: str) -> None:
        from vitune.serve.live import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitune.cli", "serve", "--model", str(model), "--port", str(self.port), "--no-web",
             "--log-level", "warning", *flags], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vitune serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vitune serve did not come up in 180 s")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- load -----------------------------------------------------------------------------------------
async def _load(url: str, clients: int, seconds: float, seed: int) -> dict[str, Any]:
    import httpx
    from fixtures.bad_inputs.corpus import image_part, tiny_png

    questions = ["what color is the circle?", "how many objects are there?", "describe the image in detail.",
                 "is the square on the left?"]
    images = [tiny_png((r, 40, 200 - r), (16 + r % 9, 16)) for r in range(0, 200, 25)]
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    failures: list[str] = []
    requests = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, requests
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            q = rng.choice(questions)
            content: Any = [image_part(rng.choice(images)), {"type": "text", "text": q}] if rng.random() < 0.7 else q
            body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(8, 32),
                    "temperature": rng.choice([0.0, 0.7]), "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.monotonic()
            first = None
            done = False
            usage = None
            requests += 1
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if "error" in event:
                            failures.append(f"error event: {event['error']}")
                            break
                        if event.get("usage"):
                            usage = event["usage"]
                        if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                            first = time.monotonic() - t0
            except (httpx.HTTPError, json.JSONDecodeError) as err:
                failures.append(f"{type(err).__name__}: {err}")
                continue
            if not done or usage is None:
                failures.append("stream ended without usage and [DONE]")
                continue
            latencies.append(time.monotonic() - t0)
            if first is not None:
                ttfts.append(first)
            tokens += int(usage["completion_tokens"])

    t_start = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.monotonic() - t_start
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": requests, "failed": len(failures),
            "p50_s": _r(percentile(latencies, 0.5)), "p99_s": _r(percentile(latencies, 0.99)),
            "tokens_per_s": round(tokens / elapsed, 1), "completion_tokens": tokens,
            "ttft_p50_s": _r(percentile(ttfts, 0.5)), "ttft_p99_s": _r(percentile(ttfts, 0.99)),
            "requests_per_s": round(len(latencies) / elapsed, 2), "failure_examples": failures[:5]}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def check_load(result: dict[str, Any], failures: list[str]) -> None:
    if result["failed"]:
        failures.append(f"load: {result['failed']} failed requests, e.g. {result['failure_examples'][:2]}")
    if result["requests"] < result["clients"]:
        failures.append(f"load: only {result['requests']} requests for {result['clients']} clients")


# -- bombs ----------------------------------------------------------------------------------------
def bombs(url: str, pid: int) -> dict[str, Any]:
    import httpx
    from fixtures.bad_inputs.corpus import IMAGES, PeakRSS, data_url, image_part, png_bomb, tiny_png

    def chat(content: Any) -> dict[str, Any]:
        return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4}

    t0 = time.monotonic()
    bomb = png_bomb(30_000, 30_000)  # 9 x 10^8 pixels, a full zlib stream of zeros
    bomb_build_s = time.monotonic() - t0
    cases: dict[str, tuple[Callable[[], bytes], int, str | None]] = {
        "png_bomb_30000x30000": (lambda: json.dumps(chat([image_part(bomb), {"type": "text", "text": "hi"}])).encode(), 400, "invalid_image"),
        "base64_50MB": (lambda: json.dumps(chat([{"type": "image_url", "image_url": {"url": data_url(os.urandom(3 * 50 * 2**20 // 4))}}])).encode(),
                        413, "request_too_large"),
        "images_1000": (lambda: json.dumps(chat([image_part(tiny_png((i % 250, 9, 9))) for i in range(1000)])).encode(), 400, "too_many_images"),
        "prompt_1M_chars": (lambda: json.dumps(chat("a" * 1_000_000)).encode(), 400, "context_length_exceeded"),
        "nested_json_1M": (lambda: b"[" * 500_000 + b"]" * 500_000, 400, "invalid_json"),
        "wide_10000x10_x8": (lambda: json.dumps(chat([image_part(IMAGES["wide_10000x10.png"][0]())] * 8 + [{"type": "text", "text": "hi"}])).encode(),
                             200, None),
    }
    out: dict[str, Any] = {"bomb_png_bytes": len(bomb), "bomb_build_s": round(bomb_build_s, 2)}
    with httpx.Client(timeout=120) as http:
        for name, (make, status, code) in cases.items():
            body = make()
            with PeakRSS(interval_s=0.005, pid=pid) as mem:
                r = http.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            got_code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            out[name] = {"bytes": len(body), "status": r.status_code, "code": got_code, "expected_status": status,
                         "seconds": round(mem.seconds, 3), "server_rss_growth_mb": round(mem.growth_mb, 1)}
            log(f"bomb {name}: {out[name]}")
        alive = http.post(url + "/v1/chat/completions", json=chat([image_part(tiny_png()), {"type": "text", "text": "color?"}]))
        out["answers_after"] = alive.status_code
    return out


def check_bombs(result: dict[str, Any], failures: list[str], max_s: float = 10.0, max_mb: float = 300.0) -> None:
    for name, case in result.items():
        if not isinstance(case, dict):
            continue
        if case["status"] != case["expected_status"]:
            failures.append(f"bombs: {name} answered {case['status']} ({case['code']}), expected {case['expected_status']}")
        if case["seconds"] > max_s:
            failures.append(f"bombs: {name} took {case['seconds']} s (> {max_s})")
        # eight 10000x10 images cost what eight legitimate 2048x2048 photos cost (the padded square is bounded)
        limit_mb = 2 * max_mb if name.startswith("wide_") else max_mb
        if case["server_rss_growth_mb"] > limit_mb:
            failures.append(f"bombs: {name} grew the server by {case['server_rss_growth_mb']} MB (> {limit_mb})")
    if result.get("answers_after") != 200:
        failures.append(f"bombs: the server answered {result.get('answers_after')} after the attacks")


# -- kills ----------------------------------------------------------------------------------------
def training_kills(model: Path, work: Path, kills: int, steps: int, seed: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from vitune.data.tiny import make_tiny_dataset
    from vitune.train.trainer import checkpoint_dirs

    data = work / "train-data"
    if not (data / "stage2.json").is_file():
        make_tiny_dataset(data, n=24, stage=2, text_only=0.25, seed=0)
    preset = work / "train.yaml"
    preset.write_text("train: {seed: 0}\n")

    def args(out: Path) -> list[str]:
        return ["train", str(preset), f"model.path={model}", f"data.path={data / 'stage2.json'}", f"data.image_folder={data}",
                "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "stage.lora=null", "train.batch_size=4",
                "train.micro_batch_size=2", f"train.max_steps={steps}", "optim.warmup_steps=2", "train.save_every=1",
                "train.keep_last=2", "train.progress=false", "train.log_every=1", f"train.output_dir={out}"]

    def lines(out: Path) -> int:
        p = out / "metrics.jsonl"
        return p.read_bytes().count(b"\n") if p.exists() else 0

    for d in ("ref", "killed"):
        shutil.rmtree(work / d, ignore_errors=True)
    ref = subprocess.run([sys.executable, "-m", "vitune.cli", *args(work / "ref")], env=ENV, capture_output=True, text=True)
    if ref.returncode != 0:
        raise RuntimeError(ref.stderr[-3000:])
    out = work / "killed"
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, steps - 1), kills))
    killed_at = []
    for i, k in enumerate(targets):
        cmd = [sys.executable, "-m", "vitune.cli", *args(out), *(["--resume"] if i else [])]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while (lines(out) < k or not checkpoint_dirs(out)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is not None:
            raise RuntimeError(f"training ended before the kill at step {k}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(rng.uniform(0, 0.3))  # anywhere in the next step, checkpoint writes included
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append({"after_step": k, "checkpoints": [p.name for p in checkpoint_dirs(out)]})
        log(f"training killed after step {k}; checkpoints {killed_at[-1]['checkpoints']}")
    final = subprocess.run([sys.executable, "-m", "vitune.cli", *args(out), "--resume"], env=ENV, capture_output=True, text=True)
    if final.returncode != 0:
        raise RuntimeError(final.stderr[-3000:])
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(work / "ref" / "model" / "model.safetensors"))
    different = [k for k in b if not torch.equal(a[k], b[k])]
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    return {"steps": steps, "kills": len(killed_at), "killed": killed_at, "tensors": len(b),
            "tensors_different": len(different), "losses_equal": losses(out) == losses(work / "ref"),
            "equal_to_uninterrupted": not different and losses(out) == losses(work / "ref")}


def kills(model: Path, work: Path, seed: int) -> dict[str, Any]:
    from test_reliability_faults import run_datagen_with_kills, run_eval_with_kills

    out: dict[str, Any] = {}
    for name, fn in (("datagen", lambda d: run_datagen_with_kills(d, scenes=20, kills=6, seed=seed)),
                     ("eval", lambda d: run_eval_with_kills(d, questions=60, kills=6, seed=seed)),
                     ("training", lambda d: training_kills(model, d, kills=3, steps=10, seed=seed))):
        d = work / f"kills-{name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        t0 = time.monotonic()
        try:
            out[name] = fn(d)
        except (AssertionError, RuntimeError) as err:  # a failed guarantee is a result, not a crash of the run
            out[name] = {"equal_to_uninterrupted": False, "error": f"{type(err).__name__}: {err}"[:2000]}
        out[name]["seconds"] = round(time.monotonic() - t0, 1)
        log(f"kills {name}: {out[name]}")
    return out


def check_kills(result: dict[str, Any], failures: list[str]) -> None:
    for name, r in result.items():
        if not r.get("equal_to_uninterrupted"):
            failures.append(f"kills: {name}: {r.get('error') or r}")


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stress")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--only", default="load,bombs,kills", help="comma-separated subset of load,bombs,kills")
    parser.add_argument("--seed", type=int, default=None, help="random kill points (default: random, recorded)")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    unknown = parts - {"load", "bombs", "kills"}
    if unknown:
        parser.error(f"unknown --only parts {sorted(unknown)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    from vitune.io import atomic_write_json

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    results: dict[str, Any] = {"seed": seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    failures: list[str] = []
    t0 = time.monotonic()
    model = tiny_model(work)
    try:
        if parts & {"load", "bombs"}:
            # The tiny model's own limits except for the batch (all clients decode together) and the queue.
            with ServerProcess(model, "--max-batch-size", "32", "--max-queue", str(max(128, 2 * args.clients))) as server:
                if "bombs" in parts:
                    log("bombs against the server's default limits")
                    results["bombs"] = bombs(server.url, server.proc.pid)
                    check_bombs(results["bombs"], failures)
                if "load" in parts:
                    log(f"load: {args.clients} streaming clients for {args.seconds:g} s")
                    results["load"] = asyncio.run(_load(server.url, args.clients, args.seconds, seed))
                    log(f"load: {results['load']}")
                    check_load(results["load"], failures)
        if "kills" in parts:
            results["kills"] = kills(model, work, seed)
            check_kills(results["kills"], failures)
    except Exception:  # noqa: BLE001 - recorded in the results, then the exit status says it failed
        failures.append("crashed: " + traceback.format_exc()[-3000:])
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["passed"] = not failures
    results["failures"] = failures
    atomic_write_json(args.out / "results.json", results)
    log(f"{'PASSED' if not failures else 'FAILED'} in {results['seconds']} s -> {args.out / 'results.json'}")
    for f in failures:
        log(f"  {f}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
