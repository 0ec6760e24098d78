"""Shared fixtures: tiny backbones and a tiny built LLaVA model, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(vision_dir, llm_dir): a random tiny CLIP vision tower and a tiny Llama with a trained tokenizer."""
    from vitune.testing import make_tiny_backbones

    return make_tiny_backbones(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_backbones: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny vitune model directory (CLIP + Llama, mlp2x_gelu, vicuna_v1), built once."""
    from vitune.model.build import build_llava

    vision, llm = tiny_backbones
    out = tmp_path_factory.mktemp("model") / "tiny"
    model, processor = build_llava(str(vision), str(llm))
    model.save_pretrained(out, processor)
    return out
