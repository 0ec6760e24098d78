"""Two-stage training: typed config and presets, the accelerate loop, LoRA, merging.

Entry points: `load_config(preset, overrides) -> Config`, `run_training(config) -> Path` (the run
directory), `merge_lora(base, adapter, out)`. Torch and transformers are imported on first use,
so the CLI's `--help` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitune.train.config import Config, list_presets, load_config

__all__ = ["Config", "list_presets", "load_config", "merge_lora", "run_training"]


def run_training(config: Config, resume: bool | str = False,
                 on_step: Callable[[dict[str, Any]], bool | None] | None = None) -> Path:
    """Train as `config` says; returns the run directory (see `vitune.train.trainer`)."""
    from vitune.train.trainer import run_training as run

    return run(config, resume=resume, on_step=on_step)


def merge_lora(base: str | Path | None, adapter: str | Path, out: str | Path, projector: str | Path | None = None) -> Path:
    """A full model directory from a base model and a LoRA adapter (see `vitune.train.lora`)."""
    from vitune.train.lora import merge_lora as merge

    return merge(base, adapter, out, projector=projector)
