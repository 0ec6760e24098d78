"""The demo pipeline end to end on its `quick` preset: every step runs and writes what it promises."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from vitune.demo import EVAL_TASKS, PRESETS, STEPS, Demo, DemoConfig


def test_quick_demo_runs_every_step_and_reuses_them(tmp_path: Path, capsys) -> None:
    config = DemoConfig(**{**asdict(PRESETS["quick"]), "out": str(tmp_path / "demo")})
    metrics = Demo(config).run()
    out = Path(config.out)
    # metrics.json: the contract of issue 7
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"].keys() == set(STEPS)
    assert saved["total_seconds"] == metrics["total_seconds"] > 0
    for task in EVAL_TASKS:
        r = saved["eval"][task]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 < r["chance"] < 1.0
        assert r["by_type"] and all({"accuracy", "chance", "n"} <= set(v) for v in r["by_type"].values())
    assert set(saved["eval"]["toy-vqa"]["by_type"]) == {"color", "shape", "count", "position", "existence", "relation"}
    # each stage directory holds its resolved config, metrics, model; stage 1 its projector
    for stage in ("stage1", "stage2"):
        assert (out / stage / "config.yaml").is_file()
        lines = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert lines and all({"step", "loss"} <= set(x) for x in lines)
        assert (out / stage / "model" / "config.json").is_file()
    assert (out / "stage1" / "projector" / "projector.safetensors").is_file()
    for name in ("world/train.jsonl", "world/test.jsonl", "backbones/clip/config.json", "backbones/lm/config.json",
                 "data/stage1.json", "data/instruct.json", "model/config.json"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "toy-vqa" in printed and "assistant:" in printed
    # a rerun reuses every finished step
    again = Demo(config).run()
    assert "reused" in capsys.readouterr().out
    assert again["steps"] == metrics["steps"]
    # redoing a step redoes those after it, not those before
    Demo(config).run(only=["eval"])
    printed = capsys.readouterr().out
    assert "world: reused" in printed and "stage2: reused" in printed and "eval: reused" not in printed
