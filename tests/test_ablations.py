"""The ablation runner: variants change only what they name; results carry mean and std per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitune.ablations import run_ablations, summarize, variant_config
from vitune.demo import PRESETS
from vitune.errors import VituneError


def test_variants_change_only_what_they_name(tmp_path: Path) -> None:
    base = PRESETS["default"]
    full = variant_config(base, "full", 1, tmp_path)
    assert full.seed == 1 and full.mix == base.mix and full.stage1
    assert not variant_config(base, "no-stage1", 0, tmp_path).stage1
    only = variant_config(base, "detail-only", 0, tmp_path)
    assert only.mix == {"detail": sum(base.mix.values())}
    assert (only.vqa_scenes, only.mc_scenes, only.stage2_overrides) == (base.vqa_scenes, base.mc_scenes, base.stage2_overrides)
    with pytest.raises(VituneError, match="unknown variant"):
        variant_config(base, "bigger-model", 0, tmp_path)


def metrics(acc: float) -> dict:
    by_type = {"color": {"accuracy": acc, "chance": 0.2, "n": 10}}
    return {"total_seconds": 10.0, "eval": {t: {"accuracy": acc, "chance": 0.25, "by_type": by_type} for t in ("toy-vqa", "toy-scienceqa", "toy-bench")}}


def test_summarize_mean_and_std() -> None:
    out = summarize({"full": [metrics(0.5), metrics(0.7)], "no-stage1": [metrics(0.4), metrics(0.4)]})
    full = out["variants"]["full"]["tasks"]["toy-vqa"]
    assert full["mean"] == pytest.approx(0.6) and full["std"] == pytest.approx(0.1414, abs=1e-4)
    assert full["by_type"]["color"]["mean"] == pytest.approx(0.6)
    assert out["variants"]["no-stage1"]["tasks"]["toy-bench"]["std"] == 0.0


def test_quick_ablation_end_to_end(tmp_path: Path) -> None:
    results = run_ablations(tmp_path / "abl", seeds=2, preset="quick", variants=("no-stage1",))
    saved = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert saved["variants"]["no-stage1"]["seeds"] == 2
    assert set(saved["variants"]["no-stage1"]["tasks"]) == {"toy-vqa", "toy-scienceqa", "toy-bench"}
    assert results["variants"] == saved["variants"]
    # the world and backbones were made once and shared
    assert (tmp_path / "abl" / "no-stage1" / "seed1" / "world").is_symlink()
    assert not (tmp_path / "abl" / "no-stage1" / "seed0" / "stage1" / "model").exists()
