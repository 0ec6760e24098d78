"""The benchmark harness: a smoke run writes results.json in the contract's schema with ratios
computed from the two systems' figures; the measuring helpers do what they say. No timing
thresholds: speed is what `make bench` reports, not what a unit test asserts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench/` lives at the repository root

from bench import measure  # noqa: E402
from bench.cases import CASES, _agreement  # noqa: E402
from bench.presets import get_preset, train_bench_tokenizer, with_overrides  # noqa: E402
from bench.run import TARGETS, choose_threads, format_table, main  # noqa: E402
from vitune.errors import VituneError  # noqa: E402


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITUNE_CACHE_DIR", str(root / "cache"))  # the compiled decode steps' libraries
        assert main(["--presets", "smoke", "--root", str(root), "--threads", "1"]) == 0
    return json.loads((root / "results.json").read_text())


def test_smoke_run_writes_the_contract_schema(smoke_results: dict) -> None:
    machine = smoke_results["machine"]
    for key in ("cpu", "cores", "threads", "torch", "transformers", "load_average_start", "load_average_end",
                "matmul_gflops", "copy_gb_s", "date"):
        assert key in machine, key
    assert machine["threads"] == 1 and machine["threads_reason"] == "--threads"
    cases = smoke_results["cases"]
    assert [c["name"] for c in cases] == list(CASES)
    for c in cases:
        assert {"name", "preset", "vitune", "reference", "unit", "ratio"} <= set(c)
        assert c["preset"] == "smoke"
        assert c["vitune"] > 0 and c["reference"] > 0 and math.isfinite(c["ratio"])
        # ratio = vitune / reference (the bound for mfu and decode_bw), from the unrounded figures
        assert c["ratio"] == pytest.approx(c["vitune"] / c["reference"], rel=2e-3)


def test_smoke_run_records_repeats_memory_and_bounds(smoke_results: dict) -> None:
    by_name = {c["name"]: c for c in smoke_results["cases"]}
    work = get_preset("smoke").work
    b1 = by_name["decode_b1"]
    assert len(b1["seconds"]["vitune"]) == len(b1["seconds"]["reference"]) == work.repeats
    # the smoke model is small: vitune decodes with its compiled step, its eager step timed beside it
    for case in (b1, by_name["decode_b8"]):
        assert case["compiled_step"] is True and set(case["peak_mb"]) == {"vitune", "reference", "vitune_eager"}
        assert case["eager"]["ratio"] == pytest.approx(case["eager"]["vitune"] / case["reference"], rel=2e-3)
        assert len(case["seconds"]["vitune_eager"]) == work.repeats
    # both systems produced full-length outputs that can be compared token by token
    assert 0.0 <= b1["token_agreement"] <= 1.0 and b1["new_tokens"] == work.new_tokens
    assert by_name["decode_b8"]["batch"] == work.batch and len(set(by_name["decode_b8"]["prompt_tokens"])) > 1
    train = by_name["train_step"]
    assert train["with_image"] < train["samples"]  # a mix with text-only samples
    # the reference pads to the longest and runs the head on every position: more work per sample
    assert train["gflop_per_sample"]["reference"] > train["gflop_per_sample"]["vitune"] > 0
    assert train["flop_ratio"] == pytest.approx(train["gflop_per_sample"]["reference"] / train["gflop_per_sample"]["vitune"], rel=0.02)
    assert train["gflop_per_s"]["vitune"] == pytest.approx(train["vitune"] * train["gflop_per_sample"]["vitune"], rel=0.02)
    assert by_name["mfu"]["unit"] == "GFLOP/s" and "matmul" in by_name["mfu"]["bound"]
    assert 0 < by_name["mfu"]["transformers_ratio"] and by_name["mfu"]["flops_per_sample_g"] > 0
    assert by_name["decode_bw"]["bytes_per_token_mb"] > 0 and by_name["decode_bw"]["bandwidth_gb_s"] > 0


def test_alternate_interleaves_warms_up_and_counts() -> None:
    calls: list[str] = []
    timings = measure.alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                                repeats=3, warmup=1)
    # a warm-up round (sampling memory), then three timed rounds; the order flips every round
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(timings["a"].seconds) == 3 and timings["a"].result == 1 and timings["b"].result == 2
    assert timings["a"].peak_mb is not None
    with pytest.raises(ValueError):
        measure.alternate({"a": lambda: None}, repeats=1, warmup=0)
    calls.clear()
    quiet = measure.alternate({"a": lambda: calls.append("a")}, repeats=2, warmup=0, memory=False, clock="cpu")
    assert calls == ["a", "a"] and len(quiet["a"].seconds) == 2 and quiet["a"].peak_mb is None


def test_peak_memory_sees_an_allocation() -> None:
    import numpy as np

    with measure.PeakMemory() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block.sum()
        del block
    assert mem.peak_mb >= 48


def test_presets_are_exact_names_and_overridable() -> None:
    with pytest.raises(VituneError, match="unknown benchmark preset"):
        get_preset("Wide")
    wide = get_preset("wide")
    assert wide.shape.lm_hidden >= 1536 and wide.shape.vision_hidden == 768 and wide.shape.image_tokens == 196
    assert with_overrides(wide, repeats=7).work.repeats == 7
    with pytest.raises(VituneError, match="unknown workload"):
        with_overrides(wide, repeat=7)


def test_bench_tokenizer_has_the_vocabulary_and_round_trips() -> None:
    tok = train_bench_tokenizer(900)
    assert len(tok) == 900
    text = "A chat between a curious user and an assistant. Describe the image, café 日本!"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_agreement_and_table() -> None:
    assert _agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert _agreement([[1, 2, 9, 4]], [[1, 2, 3, 4]]) == 0.5
    rows = [{"name": "decode_b1", "preset": "toy", "vitune": 10.0, "reference": 2.0, "unit": "tokens/s", "ratio": 5.0},
            {"name": "prefill", "preset": "wide", "vitune": 1.0, "reference": 1.0, "unit": "prefills/s", "ratio": 1.0}]
    table = format_table(rows)
    assert ">= 3 ok" in table and ">= 1.2 MISSED" in table
    assert TARGETS[("decode_b1", "toy")] == 3.0


def test_threads_follow_the_flag() -> None:
    assert choose_threads(3) == (3, "--threads")
    n, reason = choose_threads(None)
    assert 1 <= n and reason.startswith("auto")
