"""Projectors: the trainable bridge from vision features to the LLM's embedding space, by name.

`linear` is the paper's; `mlp{N}x_gelu` (N linear layers with GELU between) is LLaVA-1.5's with
N=2; `identity` for encoders already in the LLM's width. Layer indices match the original
release's `mm_projector.{0,2,...}` so checkpoints map one to one.
"""

from __future__ import annotations

import re

from torch import nn

from vitune.errors import VituneError

_MLP = re.compile(r"mlp([1-9][0-9]*)x_gelu")
PROJECTOR_NAMES = ("linear", "mlp{N}x_gelu", "identity")


def build_projector(name: str, vision_dim: int, text_dim: int) -> nn.Module:
    if name == "linear":
        return nn.Linear(vision_dim, text_dim)
    if name == "identity":
        if vision_dim != text_dim:
            raise VituneError(f"projector 'identity' needs equal widths, got vision {vision_dim} and LLM {text_dim}")
        return nn.Identity()
    match = _MLP.fullmatch(name)
    if match:
        depth = int(match.group(1))
        layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
        return nn.Sequential(*layers)
    raise VituneError(f"unknown projector {name!r}; choose one of: {', '.join(PROJECTOR_NAMES)}")
