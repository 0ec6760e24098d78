"""Typed config: presets, inheritance, key=value overrides parsed by type; the lr schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from vitune.errors import VituneError
from vitune.train.config import Config, LoraConfig, config_from_yaml, list_presets, load_config
from vitune.train.schedule import lr_factor, time_horizon, warmup_steps_for


def test_overrides_are_parsed_by_type() -> None:
    cfg = load_config(None, ["train.cpu=false", "train.progress=no", "optim.weight_decay=1e-3", "train.max_steps=20",
                             "stage.parts.llm=2e-5", "stage.parts.projector=frozen", "data.path=a.json,b.jsonl",
                             "model.projector=null", "optim.betas=[0.9, 0.95]", "stage.lora.r=8", "stage.lora.bits=4",
                             "train.report_to=[tensorboard]"])
    assert cfg.train.cpu is False and cfg.train.progress is False
    assert cfg.optim.weight_decay == pytest.approx(1e-3) and isinstance(cfg.optim.weight_decay, float)
    assert cfg.train.max_steps == 20
    assert cfg.stage.parts.llm == pytest.approx(2e-5) and cfg.stage.parts.projector == "frozen"
    assert cfg.data.path == ["a.json", "b.jsonl"]
    assert cfg.model.projector is None
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.stage.lora == LoraConfig(r=8, bits=4)  # a null section is created with its defaults
    assert cfg.train.report_to == ["tensorboard"]


@pytest.mark.parametrize("override,needle", [
    ("train.max_stepz=3", "unknown key 'train.max_stepz'"),
    ("train.max_steps=many", "train.max_steps: 'many' is not"),
    ("train.cpu=maybe", "not a boolean"),
    ("stage.parts.llm=fast", "stage.parts.llm"),
    ("data.on_bad_record=ignore", "'error', 'skip'"),
    ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
    ("train.max_steps", "not key=value"),
])
def test_bad_overrides_fail_loudly(override: str, needle: str) -> None:
    with pytest.raises(VituneError, match=None) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_presets_load_and_inherit() -> None:
    names = list_presets()
    for needed in ("world-stage1", "world-stage2", "llava-7b-stage1", "llava-7b-stage2", "llava-13b-stage1",
                   "llava-1.5-7b-stage1", "llava-1.5-7b-stage2", "llava-1.5-7b-stage2-lora", "llava-1.5-13b-stage2",
                   "llava-scienceqa"):
        assert needed in names
    for name in names:
        cfg = load_config(name)
        cfg.check()  # every preset is internally consistent
    s1 = load_config("world-stage1")
    assert s1.stage.template == "plain" and s1.stage.name == "pretrain"
    assert (s1.stage.parts.vision, s1.stage.parts.llm) == ("frozen", "frozen") and s1.stage.parts.projector != "frozen"
    # the paper's recipes
    v1s1, v1s2 = load_config("llava-7b-stage1"), load_config("llava-7b-stage2")
    assert (v1s1.stage.parts.projector, v1s1.train.batch_size, v1s1.train.epochs) == (2e-3, 128, 1)
    assert (v1s2.stage.parts.llm, v1s2.train.batch_size, v1s2.train.epochs) == (2e-5, 32, 3)
    v15s1, v15s2 = load_config("llava-1.5-7b-stage1"), load_config("llava-1.5-7b-stage2")
    assert (v15s1.stage.parts.projector, v15s1.train.batch_size) == (1e-3, 256)
    assert (v15s2.stage.parts.llm, v15s2.train.batch_size, v15s2.train.epochs, v15s2.stage.template) == (2e-5, 128, 1, "vicuna_v1")
    lora = load_config("llava-1.5-7b-stage2-lora")
    assert lora.stage.lora is not None and (lora.stage.lora.r, lora.stage.lora.alpha) == (128, 256)
    assert lora.stage.parts.projector == 2e-5 and lora.data.path == v15s2.data.path  # inherited
    for cfg in (v1s1, v1s2, v15s1, v15s2, lora):
        assert (cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.weight_decay, cfg.data.max_length) == (0.03, "cosine", 0.0, 2048)
        assert cfg.train.precision == "bf16" and cfg.model.gradient_checkpointing
    v13 = load_config("llava-1.5-13b-stage2")
    assert "13b" in v13.model.path and v13.train.batch_size == 128
    assert load_config("llava-scienceqa").train.epochs == 12


def test_preset_by_path_and_unknown_name(tmp_path: Path) -> None:
    child = tmp_path / "mine.yaml"
    child.write_text("inherit: world-stage2\ntrain: {max_steps: 7}\n")
    cfg = load_config(child, ["train.seed=3"])
    parent = load_config("world-stage2")
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3 and parent.train.max_steps != 7
    assert cfg.stage.parts == parent.stage.parts  # inherited, not defaulted
    assert cfg.stage.parts.llm != load_config(None).stage.parts.llm
    with pytest.raises(VituneError, match="unknown preset 'nope'.*world-stage1"):
        load_config("nope")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("llava-1.5-7b-stage2-lora", ["train.max_steps=5", "stage.parts.vision=1e-6"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert config_from_yaml(tmp_path / "config.yaml") == cfg


def test_cross_field_checks() -> None:
    base = ["model.path=m", "data.path=d.json"]
    with pytest.raises(VituneError, match="nothing would train"):
        load_config(None, [*base, "stage.parts.projector=frozen"]).check()
    with pytest.raises(VituneError, match="not a multiple"):
        load_config(None, [*base, "stage.parts.projector=1e-3", "train.batch_size=10", "train.micro_batch_size=4"]).check()
    with pytest.raises(VituneError, match="adapters a learning rate"):
        load_config(None, [*base, "stage.parts.projector=1e-3", "stage.lora.r=4"]).check()
    with pytest.raises(VituneError, match="model.path"):
        load_config(None, ["data.path=d.json", "stage.parts.projector=1e-3"]).check()
    with pytest.raises(VituneError, match="decay_ratio"):
        load_config(None, [*base, "stage.parts.projector=1e-3", "optim.schedule=wsd", "optim.decay_ratio=0"]).check()
    with pytest.raises(VituneError, match="muon_lr_scale"):
        load_config(None, [*base, "stage.parts.projector=1e-3", "optim.name=muon", "optim.muon_lr_scale=-1"]).check()
    with pytest.raises(VituneError, match="'adamw', 'muon'"):
        load_config(None, [*base, "optim.name=sgd"])
    assert isinstance(Config(), Config)


def test_schedule_warmup_then_cosine() -> None:
    total, warmup = 100, warmup_steps_for(100, 0.03)
    assert warmup == 3
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert 0 < f[0] < f[1] < f[2] < f[3] == 1.0  # rises, the first step already learns, peak after warmup
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))  # then never rises
    assert f[-1] > 0  # the last step still learns
    mid = warmup + (total - warmup) // 2
    assert f[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warmup) / (total - warmup))))
    floor = [lr_factor(s, total, warmup, min_ratio=0.1) for s in range(total)]
    assert min(floor) > 0.1 and floor[3] == 1.0
    assert [lr_factor(s, 10, 2, "constant") for s in range(2, 10)] == [1.0] * 8
    lin = [lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5)
    assert warmup_steps_for(1000, 0.03, warmup_steps=7) == 7
    with pytest.raises(ValueError):
        lr_factor(0, 10, 0, "exponential")


def test_schedule_wsd_holds_then_cools_down_over_the_last_share() -> None:
    f = [lr_factor(s, 100, 5, "wsd", decay_ratio=0.2) for s in range(100)]
    assert f[:5] == [lr_factor(s, 100, 5) for s in range(5)]  # the same warmup
    assert f[5:80] == [1.0] * 75  # stable until the last 20 steps
    assert all(a > b for a, b in zip(f[80:], f[81:], strict=False))  # then falls every step
    assert f[90] == pytest.approx(0.5) and 0 < f[-1] < 0.1  # linearly, the last step still learning
    floored = [lr_factor(s, 100, 5, "wsd", min_ratio=0.1, decay_ratio=0.2) for s in range(100)]
    assert floored[90] == pytest.approx(0.55) and floored[-1] > 0.1
    # A cool-down longer than the run after warmup starts where warmup ends.
    short = [lr_factor(s, 10, 4, "wsd", decay_ratio=0.9) for s in range(10)]
    assert short[3] < 1.0 and short[4] == 1.0 > short[5]


def test_time_horizon_is_where_the_time_runs_out() -> None:
    assert time_horizon(100, 10_000, elapsed=50.0, max_seconds=150.0, steps_per_second=2.0) == 300
    assert time_horizon(100, 250, elapsed=50.0, max_seconds=150.0, steps_per_second=2.0) == 250  # never past the plan
    assert time_horizon(100, 10_000, elapsed=160.0, max_seconds=150.0, steps_per_second=2.0) == 101  # out of time: this step ends it
    # Under wsd the rate then cools down before the time is up.
    horizon = time_horizon(280, 10_000, elapsed=140.0, max_seconds=150.0, steps_per_second=2.0)
    assert horizon == 300 and lr_factor(280, horizon, 10, "wsd", decay_ratio=0.2) == pytest.approx(1 / 3)  # 40 of its 60 cool-down steps done


def test_cli_lists_presets_and_prints_config(capsys: pytest.CaptureFixture[str]) -> None:
    from vitune.cli import main

    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "world-stage1" in out and "llava-1.5-7b-stage2-lora" in out and "lr 2e-3" in out
    assert main(["train", "world-stage1", "train.max_steps=9", "--on-bad-record", "skip", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["max_steps"] == 9 and cfg["data"]["on_bad_record"] == "skip" and cfg["stage"]["template"] == "plain"
    assert main(["train", "world-stage1", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err
