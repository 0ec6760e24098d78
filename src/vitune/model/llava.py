"""The LLaVA model: vision encoder -> projector -> image features written into the LLM's embeddings.

The processor has already expanded every `<image>` into `num_image_tokens` placeholder ids; here
the projected patch features overwrite exactly those positions (`masked_scatter`), so any number
of images per sample and text-only samples in the same batch work alike, and a count mismatch
fails loudly with both numbers.

Checkpoint layout (our own format, never pickle): config.json (`LlavaConfig`), weights in
safetensors (`model.safetensors`, sharded with an index above `max_shard_size`), tokenizer and
image-processor files beside them. Parameter names: `vision.tower.*`, `projector.*`,
`language_model.*` (the transformers causal LM's own names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from vitune.errors import VituneError
from vitune.io import atomic_dir, atomic_write_json
from vitune.model.config import LlavaConfig
from vitune.model.projector import build_projector
from vitune.model.vision import VisionEncoder, vision_tower_from_config

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PROJECTOR_WEIGHTS_NAME = "projector.safetensors"


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        tower = vision_tower if vision_tower is not None else vision_tower_from_config(config.vision_config)
        self.vision = VisionEncoder(tower, config.feature_layers, config.vision_feature_select, config.vision_has_cls)
        if language_model is None:
            text_cfg = dict(config.text_config)
            language_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(text_cfg.pop("model_type"), **text_cfg))
        self.language_model = language_model
        self.projector = build_projector(config.projector, self.vision.hidden_size, self.text_hidden_size)

    # -- structure -------------------------------------------------------------------------
    @property
    def text_hidden_size(self) -> int:
        return int(self.language_model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    def parts(self) -> dict[str, nn.Module]:
        """The named parts that training freezes or trains, each with its own learning rate."""
        return {"vision": self.vision, "projector": self.projector, "llm": self.language_model}

    # -- forward ---------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> projected features [N, num_image_tokens, text_hidden]."""
        feats = self.vision(pixel_values.to(device=self.device, dtype=next(self.vision.parameters()).dtype))
        return self.projector(feats.to(next(self.projector.parameters(), feats).dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings with image features written into the placeholder positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.config.image_token_id
        n_tokens = int(mask.sum())
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise VituneError(
                f"image placeholders and image features do not match: {n_tokens} placeholder tokens, "
                f"{n_features} features ({0 if image_features is None else image_features.shape[0]} images x "
                f"{self.config.num_image_tokens} tokens)"
            )
        if n_tokens:
            assert image_features is not None
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        embeds = self.embed(input_ids, pixel_values, image_features)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs
        )

    # -- checkpoints -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, processor: Any = None, max_shard_size: int = 4 * 1024**3) -> None:
        """Write the model (and its processor) atomically: the directory appears whole or not at all."""
        with atomic_dir(directory) as tmp:
            self.config.save(tmp)
            save_state_dict(unique_state_dict(self), tmp, max_shard_size)
            if processor is not None:
                processor.save_pretrained(tmp)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LlavaModel:
        directory = Path(directory)
        config = LlavaConfig.load(directory)
        # Every weight is overwritten by the checkpoint (load_into is strict; tied ones are re-tied),
        # so the random initialisation is skipped: it took ~6 s of a 245 M-parameter model's load.
        with no_init_weights():  # which also skips transformers' post-init tying: tie here
            model = cls(config)
        model.language_model.tie_weights()
        state = load_state_dict(directory)
        load_into(model, state, where=str(directory))
        model.language_model.tie_weights()
        model = model.to(device=device)
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.eval()

    def save_projector(self, directory: str | Path) -> None:
        """The stage-1 output: the projector alone, with the config that says what it fits."""
        with atomic_dir(directory) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}, str(tmp / PROJECTOR_WEIGHTS_NAME))
            atomic_write_json(
                tmp / "projector_config.json",
                {
                    "projector": self.config.projector,
                    "vision_hidden_size": self.vision.hidden_size,
                    "text_hidden_size": self.text_hidden_size,
                },
            )

    def load_projector(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta_path = directory / "projector_config.json"
        if not meta_path.is_file():
            raise VituneError(f"{directory}: no projector_config.json (not a projector checkpoint)")
        meta = json.loads(meta_path.read_text())
        expected = {"projector": self.config.projector, "vision_hidden_size": self.vision.hidden_size, "text_hidden_size": self.text_hidden_size}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise VituneError(f"{meta_path}: {key} is {meta.get(key)!r} but the model has {value!r}")
        state = load_file(str(directory / PROJECTOR_WEIGHTS_NAME))
        load_into(self.projector, state, where=str(directory))


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage); ties are restored on load."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_state_dict(state: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_json(directory / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_NAME).is_file():
        return load_file(str(directory / WEIGHTS_NAME))
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise VituneError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(directory / fname)))
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict loading, except for weights tied to another that is present (restored by tying)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    tied = _tied_names(module)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise VituneError(f"{where}: weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise VituneError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    module.load_state_dict(state, strict=False)


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (e.g. lm_head tied to embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n for names in groups.values() for n in names[1:]}
