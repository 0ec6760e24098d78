"""`make bench`: vitune against the transformers reference; writes `runs/bench/results.json` and
prints a table.

    python -m bench.run                           # both presets, every case (a few minutes)
    python -m bench.run --presets toy --cases decode_b1,prefill
    python -m bench.run --threads 2 --repeats 5   # override the thread count / repeats

results.json: {"machine": {...}, "cases": [{"name", "preset", "vitune", "reference", "unit",
"ratio", ...details}]}; ratio = vitune / reference (vitune / bound for mfu and decode_bw).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.cases import CASES
from bench.presets import PRESET_NAMES
from vitune.cpu import busy_cores

# The targets: (case, preset) -> minimum ratio.
TARGETS: dict[tuple[str, str], float] = {
    ("decode_b1", "toy"): 3.0,
    ("decode_b1", "wide"): 2.0,
    ("decode_b8", "wide"): 2.0,
    ("prefill", "wide"): 1.2,
    ("train_step", "wide"): 1.5,
    ("mfu", "wide"): 0.4,
    ("decode_bw", "wide"): 0.5,
}


def _split(value: str, known: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in items if x not in known]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {unknown}; known: {', '.join(known)}")
    return items


def choose_threads(requested: int | None) -> tuple[int, str]:
    """The requested count, else all cores, or 1 when other processes already keep the cores
    busy: OpenMP's barrier then waits on descheduled threads and timings become noise."""
    cores = os.cpu_count() or 1
    if requested is not None:
        return requested, "--threads"
    busy = busy_cores()
    if cores > 1 and busy > 0.5 * cores:
        return 1, f"auto: busy machine ({busy:.1f} of {cores} cores in use)"
    return cores, f"auto: idle machine ({busy:.1f} of {cores} cores in use)"


def format_table(cases: list[dict[str, Any]]) -> str:
    head = f"{'preset':6s} {'case':11s} {'vitune':>10s} {'reference':>10s} {'unit':11s} {'ratio':>7s}  target"
    lines = [head, "-" * len(head)]
    for c in cases:
        target = TARGETS.get((c["name"], c["preset"]))
        mark = "" if target is None else f">= {target:g} {'ok' if c['ratio'] >= target else 'MISSED'}"
        lines.append(f"{c['preset']:6s} {c['name']:11s} {c['vitune']:10.4g} {c['reference']:10.4g} {c['unit']:11s} "
                     f"{c['ratio']:7.3f}  {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="toy,wide", help=f"comma-separated: {', '.join(PRESET_NAMES)} (default: toy,wide)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)} (default: all)")
    parser.add_argument("--root", default="runs/bench", help="models, data and results go here (default: runs/bench)")
    parser.add_argument("--out", default=None, help="results file (default: ROOT/results.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both systems (default: auto)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="what a timing measures: elapsed time, or this process's CPU time (auto: cpu when the "
                             "machine is busy and the run single-threaded, else wall)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per decode case (default: the preset's)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode_b1 new tokens (default: the preset's, 128)")
    parser.add_argument("--no-compile-decode", action="store_true",
                        help="vitune's eager decode step only (default: the compiled step where the model is one it compiles, "
                             "its eager step reported beside it)")
    args = parser.parse_args(argv)

    presets = _split(args.presets, PRESET_NAMES, "preset")
    cases = _split(args.cases, CASES, "case")
    root = Path(args.root)
    out = Path(args.out) if args.out else root / "results.json"
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers.utils import logging as hf_logging

    from bench import measure
    from bench.cases import PresetBench
    from bench.presets import build, get_preset, with_overrides
    from vitune.io import atomic_write_json

    hf_logging.disable_progress_bar()
    threads, reason = choose_threads(args.threads)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if threads == 1 and reason.startswith("auto: busy") else "wall"
    if clock == "cpu" and threads != 1:
        raise SystemExit("bench: --clock cpu needs --threads 1 (CPU time of several threads is not elapsed time)")
    torch.set_num_threads(threads)
    machine = measure.machine_info(threads, reason, clock)
    machine["matmul_gflops"] = round(measure.matmul_flops(clock=clock) / 1e9, 1)
    machine["copy_gb_s"] = round(measure.copy_bandwidth(clock=clock) / 1e9, 2)
    print(f"bench: {machine['cpu']}, {threads} thread(s) ({reason}), {clock} clock; fp32 matmul {machine['matmul_gflops']} "
          f"GFLOP/s, copy {machine['copy_gb_s']} GB/s", flush=True)

    def log(message: str) -> None:
        print(message, flush=True)

    results: list[dict[str, Any]] = []
    presets_info: dict[str, Any] = {}
    started = time.perf_counter()
    for name in presets:
        preset = get_preset(name)
        overrides = {k: v for k, v in (("repeats", args.repeats), ("new_tokens", args.new_tokens)) if v is not None}
        if overrides:
            preset = with_overrides(preset, **overrides)
        built = build(preset, root, log=log)
        bench = PresetBench(preset, built, root, log=log, clock=clock, compile_decode=not args.no_compile_decode)
        presets_info[name] = {"note": preset.note, "shape": preset.shape.__dict__, "workload": preset.work.__dict__,
                              "parameters_m": round(sum(p.numel() for p in bench.pipe.model.parameters()) / 1e6, 2),
                              "image_tokens": bench.pipe.model.config.num_image_tokens}
        for case in cases:
            log(f"[{name}] {case}")
            t0 = time.perf_counter()
            result = bench.run(case).as_dict()
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(result)
            log(f"[{name}] {case}: vitune {result['vitune']:.4g} {result['unit']}, reference {result['reference']:.4g}, "
                f"ratio {result['ratio']:.3f}"
                + (f" (work per sample: reference / vitune = {result['flop_ratio']:.3f}; GFLOP/s vitune "
                   f"{result['gflop_per_s']['vitune']:.4g}, reference {result['gflop_per_s']['reference']:.4g})"
                   if "flop_ratio" in result else "")
                + (f" (eager step: vitune {result['eager']['vitune']:.4g}, ratio {result['eager']['ratio']:.3f})" if "eager" in result else ""))
            machine["load_average_end"] = measure.load_average()
            atomic_write_json(out, {"machine": machine, "presets": presets_info, "cases": results})
        del bench
    machine["load_average_end"] = measure.load_average()
    machine["wall_s"] = round(time.perf_counter() - started, 1)
    for c in results:
        target = TARGETS.get((c["name"], c["preset"]))
        if target is not None:
            c["target"] = target
            c["target_met"] = c["ratio"] >= target
    atomic_write_json(out, {"machine": machine, "presets": presets_info, "cases": results})
    print()
    print(format_table(results))
    print(f"\nwrote {out} ({machine['wall_s']}s; load average {machine['load_average_start']} -> {machine['load_average_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
