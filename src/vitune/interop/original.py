"""The original LLaVA release layout (haotian-liu/LLaVA): import its checkpoints into vitune.

Two things come from that code base:
- a full model: an `LlavaLlamaForCausalLM` (or Mistral / Qwen variant) directory whose config.json
  is the LLM's config plus `mm_vision_tower`, `mm_vision_select_layer`, `mm_vision_select_feature`,
  `mm_projector_type`, `mm_hidden_size`, `image_aspect_ratio`, `mm_use_im_start_end`; weights
  (`pytorch_model*.bin`, read with `weights_only=True`, or safetensors) hold the LLM
  (`model.layers.*`, `model.embed_tokens`, `lm_head`), the projector (`model.mm_projector.*`) and,
  when the tower was tuned, the tower (`model.vision_tower.vision_tower.vision_model.*`); otherwise
  the tower is loaded from `mm_vision_tower` (a path or hub id; `vision=` overrides it).
- a stage-1 `mm_projector.bin`: the projector alone, loaded into a base vitune model or written
  as a vitune projector checkpoint.

The original tokenizer has no `<image>` token: prompts carry the sentinel id -200 where the image
goes, and the model splices the features in there. Here `<image>` is added to the tokenizer, the
embeddings grow by one row (the mean of the others), and `expand_image_sentinel` turns original
prompt ids into vitune ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitune.errors import VituneError
from vitune.interop.hf import (
    KeyRule,
    assemble,
    clean_config,
    load_torch_weights,
    prepare_tokenizer_for,
    read_weights,
    remap,
    resolve_dtype,
    split_parts,
    tower_inner_prefix,
)
from vitune.io import atomic_dir, atomic_write_json
from vitune.model.llava import PROJECTOR_WEIGHTS_NAME, LlavaModel, load_into
from vitune.model.projector import build_projector
from vitune.processor import LlavaProcessor
from vitune.registry import Registry

IMAGE_SENTINEL = -200  # IMAGE_TOKEN_INDEX of the original code base
PROJECTOR_FILE = "mm_projector.bin"


@dataclass(frozen=True)
class OriginalArchitecture:
    text_model_type: str  # the transformers model_type of the LLM inside


# `architectures[0]` of an original checkpoint's config.json, exact match.
ARCHITECTURES: Registry[OriginalArchitecture] = Registry("original LLaVA architecture")
ARCHITECTURES.add("LlavaLlamaForCausalLM", OriginalArchitecture("llama"))
ARCHITECTURES.add("LlavaMistralForCausalLM", OriginalArchitecture("mistral"))
ARCHITECTURES.add("LlavaQwenForCausalLM", OriginalArchitecture("qwen2"))

# Keys of the original config.json that describe LLaVA and its training, not the LLM.
_LLAVA_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "freeze_mm_mlp_adapter", "freeze_mm_vision_resampler", "tune_mm_mlp_adapter", "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower", "use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution",
    "image_split_resolution", "tokenizer_model_max_length", "tokenizer_padding_side", "mm_tunable_parts", "max_length",
})
_ASPECT = {"pad": "pad", "square": "crop", None: "crop"}  # the original's "square" = the processor's resize + crop

# Buffers older transformers saved that current ones recompute from the config.
ORIGINAL_DROP = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
# The stand-alone projector: `model.mm_projector.*` as stage 1 saves it, or without `model.`.
PROJECTOR_RULES = [KeyRule(r"model\.mm_projector\.(.+)", r"\1"), KeyRule(r"mm_projector\.(.+)", r"\1")]


def original_rules(inner: str, lm_base: str) -> list[KeyRule]:
    """Original names -> vitune names (`inner`: our tower's own prefix; `lm_base`: the causal
    LM's base_model_prefix, `model` for Llama/Mistral/Qwen2, as in the original classes)."""
    return [
        KeyRule(r"model\.mm_projector\.(.+)", r"projector.\1"),
        KeyRule(r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", rf"vision.tower.{inner}\1"),
        KeyRule(r"model\.(?!mm_projector\.|vision_tower\.)(.+)", rf"language_model.{lm_base}.\1"),
        KeyRule(r"lm_head\.(.+)", r"language_model.lm_head.\1"),
    ]


def expand_image_sentinel(ids: list[int], image_token_id: int, num_image_tokens: int, sentinel: int = IMAGE_SENTINEL) -> list[int]:
    """Original-style prompt ids (one `-200` per image) -> vitune ids (`num_image_tokens`
    placeholders per image), as `tokenizer_image_token` + the original model's splice do."""
    out: list[int] = []
    for token in ids:
        out.extend([image_token_id] * num_image_tokens if token == sentinel else [token])
    return out


# -- full model -------------------------------------------------------------------------------
def read_original_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise VituneError(f"{src}: no config.json")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if "mm_vision_tower" not in cfg:
        raise VituneError(f"{path}: no mm_vision_tower, so not an original LLaVA checkpoint (for transformers' layout use --format hf)")
    if cfg.get("mm_use_im_start_end"):
        raise VituneError(f"{path}: mm_use_im_start_end=true (image start/end tokens) is not supported; only LLaVA-1.5-style checkpoints are")
    if cfg.get("mm_patch_merge_type", "flat") != "flat":
        raise VituneError(f"{path}: mm_patch_merge_type {cfg['mm_patch_merge_type']!r} (LLaVA-NeXT) is not supported; only 'flat'")
    if cfg.get("image_aspect_ratio") not in _ASPECT:
        raise VituneError(f"{path}: image_aspect_ratio {cfg.get('image_aspect_ratio')!r} is not supported; use 'pad' or 'square'")
    if cfg.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise VituneError(f"{path}: mm_vision_select_feature {cfg['mm_vision_select_feature']!r}; expected 'patch' or 'cls_patch'")
    return cfg


def text_config(cfg: dict[str, Any], where: str) -> Any:
    """The LLM's transformers config: the original config.json without its LLaVA keys."""
    from transformers import AutoConfig

    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise VituneError(f"{where}: architectures must name one class, got {archs!r}; known: {', '.join(ARCHITECTURES.names())}")
    arch = ARCHITECTURES.get(archs[0])
    rest = {k: v for k, v in cfg.items() if k not in _LLAVA_CONFIG_KEYS and not k.startswith("mm_")}
    if rest.get("rope_scaling", 0) is None:
        del rest["rope_scaling"]  # transformers 4.x wrote an explicit null; 5.x reads rope_parameters
    return AutoConfig.for_model(arch.text_model_type, **rest)


def import_original(
    src: str | Path,
    out: str | Path,
    template: str | None = None,
    vision: str | None = None,
    base: str | Path | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """An original LLaVA checkpoint (directory) or stage-1 `mm_projector.bin` -> vitune.

    A projector file (or a directory holding only `mm_projector.bin`) becomes a full model when
    `base` (a vitune model directory) is given, else a vitune projector checkpoint. `template`
    defaults to vicuna_v1 for a full model and to the base's own for a projector."""
    src, out = Path(src), Path(out)
    if src.is_file() or (src.is_dir() and (src / PROJECTOR_FILE).is_file() and not _has_full_weights(src)):
        return import_projector(src if src.is_file() else src / PROJECTOR_FILE, out, base=base, template=template)
    if not src.is_dir():
        raise VituneError(f"{src}: no such file or directory")
    if base is not None:
        raise VituneError(f"{src}: --base is only for a stand-alone {PROJECTOR_FILE}; this is a full checkpoint")
    return _import_full(src, out, template or "vicuna_v1", vision, dtype, trust_remote_code)


def _has_full_weights(src: Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any((src / n).is_file() for n in names)


def _import_full(src: Path, out: Path, template: str, vision: str | None, dtype: str, trust_remote_code: bool) -> Path:
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    from vitune.model.vision import load_vision_tower

    cfg = read_original_config(src)
    where = str(src / "config.json")
    state = read_weights(src)
    torch_dtype = resolve_dtype(dtype, state)

    tower_path = vision or cfg["mm_vision_tower"]
    try:
        tower = load_vision_tower(str(tower_path), trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(str(tower_path), trust_remote_code=trust_remote_code)
    except VituneError:
        raise
    except Exception as err:
        raise VituneError(
            f"{where}: cannot load the vision tower {tower_path!r} (mm_vision_tower; pass --vision PATH to use a local copy): {err}"
        ) from None
    layer = cfg.get("mm_vision_select_layer", -2)
    n_layers = 1 if isinstance(layer, int) else len(layer)
    width = int(tower.config.hidden_size) * n_layers
    if cfg.get("mm_hidden_size") not in (None, width):
        raise VituneError(f"{where}: mm_hidden_size is {cfg['mm_hidden_size']} but the vision tower {tower_path!r} gives {width}")

    llm_config = text_config(cfg, where)
    language_model = AutoModelForCausalLM.from_config(llm_config)
    rules = original_rules(tower_inner_prefix(tower), language_model.base_model_prefix)
    mapping = remap(state, rules, where=str(src), drop=ORIGINAL_DROP)
    parts = split_parts({dst: state[key] for key, dst in mapping.items()})
    load_into(language_model, parts["language_model."], where=f"{src} (language model)")
    language_model.tie_weights()
    if parts["vision.tower."]:
        load_into(tower, parts["vision.tower."], where=f"{src} (vision tower)")

    # config= keeps AutoTokenizer from reading config.json, whose model_type "llava" it would take
    # for transformers' (different) LLaVA.
    tokenizer = AutoTokenizer.from_pretrained(str(src), config=llm_config, trust_remote_code=trust_remote_code)
    tokenizer = prepare_tokenizer_for(language_model, tokenizer, template)
    model, processor = assemble(
        tower, language_model, tokenizer, image_processor, cfg.get("mm_projector_type", "linear"), layer,
        cfg.get("mm_vision_select_feature", "patch"), _ASPECT[cfg.get("image_aspect_ratio")], template,
    )
    load_into(model.projector, parts["projector."], where=f"{src} (mm_projector)")
    model = model.to(torch_dtype)
    model.save_pretrained(out, processor)
    return out


# -- stage-1 projector ------------------------------------------------------------------------
def infer_projector(state: dict[str, torch.Tensor], where: str) -> tuple[str, int, int]:
    """(projector name, vision width, text width) from a projector state dict's keys and shapes."""
    keys = set(state)
    if keys == {"weight", "bias"}:
        weight = state["weight"]
        return "linear", int(weight.shape[1]), int(weight.shape[0])
    indices = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"(\d+)\.(weight|bias)", k))})
    expected = {f"{i}.{p}" for i in indices for p in ("weight", "bias")}
    if indices and indices == list(range(0, 2 * len(indices), 2)) and keys == expected:
        first, last = state["0.weight"], state[f"{indices[-1]}.weight"]
        return f"mlp{len(indices)}x_gelu", int(first.shape[1]), int(last.shape[0])
    raise VituneError(f"{where}: projector keys {sorted(keys)[:8]} are neither a linear nor an mlp{{N}}x_gelu projector")


def read_projector(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise VituneError(f"{path}: no such file")
    raw = load_file(str(path)) if path.suffix == ".safetensors" else load_torch_weights(path)
    mapping = remap(raw, PROJECTOR_RULES, where=str(path))
    return {dst: raw[key] for key, dst in mapping.items()}


def import_projector(path: str | Path, out: str | Path, base: str | Path | None = None, template: str | None = None) -> Path:
    """A stage-1 `mm_projector.bin` -> `base` with this projector (a full vitune model), or,
    without `base`, a vitune projector checkpoint (`LlavaModel.load_projector` reads it)."""
    path, out = Path(path), Path(out)
    state = read_projector(path)
    name, vision_dim, text_dim = infer_projector(state, str(path))
    beside = path.parent / "config.json"
    if beside.is_file():
        declared = json.loads(beside.read_text(encoding="utf-8")).get("mm_projector_type")
        if declared is not None and declared != name:
            raise VituneError(f"{beside}: mm_projector_type is {declared!r} but {path.name} holds a {name!r} projector")
    if base is None:
        projector = build_projector(name, vision_dim, text_dim)
        load_into(projector, state, where=str(path))
        with atomic_dir(out) as tmp:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(tmp / PROJECTOR_WEIGHTS_NAME))
            atomic_write_json(tmp / "projector_config.json", {"projector": name, "vision_hidden_size": vision_dim, "text_hidden_size": text_dim})
        return out
    model = LlavaModel.from_pretrained(base)
    if model.config.projector != name:
        raise VituneError(f"{path}: holds a {name!r} projector but the base model {base} has {model.config.projector!r}")
    load_into(model.projector, {k: v.to(_dtype_of(model.projector)) for k, v in state.items()}, where=str(path))
    processor = LlavaProcessor.from_pretrained(base, model.config)
    if template and template != model.config.template:
        model.config.template = template
        tokenizer = prepare_tokenizer_for(model.language_model, processor.tokenizer, template)
        model.config.text_config = clean_config(model.language_model.config)
        processor = LlavaProcessor(tokenizer, processor.image_processor, model.config)
    model.save_pretrained(out, processor)
    return out


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
