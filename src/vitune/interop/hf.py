"""transformers' LLaVA layout (`LlavaForConditionalGeneration`): export a vitune model to it, import one from it.

The exported directory is what transformers, vLLM and SGLang load: config.json (`LlavaConfig`),
safetensors weights under the hub's canonical names (those of `llava-hf/llava-1.5-7b-hf`, which
every transformers version and both servers read), the tokenizer, `preprocessor_config.json`
(`LlavaImageProcessor`, `do_pad` for LLaVA-1.5's pad-to-square), `processor_config.json`
(`LlavaProcessor` with the patch size, feature strategy and extra tokens so `AutoProcessor`
expands `<image>` to the same number of placeholders as vitune) and a Jinja chat template
generated from our own template, so `apply_chat_template` renders exactly what vitune trained on.

Key mapping is explicit: `EXPORT_RULES` and `import_rules()` are tables of anchored patterns;
every key must match exactly one rule (`remap`), and the result is loaded strictly. Import reads
both the hub names (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`) and the module names transformers >= 4.52 saves
(`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`).

Only the `mlp2x_gelu` projector (Linear, GELU, Linear, with biases) exists in that layout.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitune.errors import VituneError
from vitune.io import atomic_dir, atomic_write_json
from vitune.model.build import assemble, clean_config
from vitune.model.config import LlavaConfig
from vitune.model.llava import LlavaModel, load_into, load_state_dict, save_state_dict
from vitune.model.vision import count_tokens, vision_tower_from_config
from vitune.processor import LlavaProcessor
from vitune.templates import IMAGE_MARKER, HFTemplate, Template, get_template

# A file beside the exported weights that records what vitune knew (foreign tools ignore it):
# the template name, so `vitune import --format hf` restores it without being told.
EXPORT_INFO_NAME = "vitune_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
HF_PROJECTOR = "mlp2x_gelu"
# Vision families whose hub-layout keys carry the inner `vision_model.` module (CLIP, SigLIP).
HF_VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- key tables -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyRule:
    """One anchored rename: a key that fully matches `pattern` becomes `target` (`\\1` = group 1)."""

    pattern: str
    target: str

    def apply(self, key: str) -> str | None:
        match = re.fullmatch(self.pattern, key)
        return match.expand(self.target) if match else None


def remap(keys: Iterable[str], rules: Sequence[KeyRule], where: str, drop: Sequence[str] = ()) -> dict[str, str]:
    """{source key: target key}. Keys fully matching a `drop` pattern are left out (each such
    pattern documents why where it is defined); every other key must match exactly one rule,
    and no two keys may land on the same target."""
    out: dict[str, str] = {}
    unmapped: list[str] = []
    for key in keys:
        if any(re.fullmatch(p, key) for p in drop):
            continue
        hits = [(rule, target) for rule in rules if (target := rule.apply(key)) is not None]
        if not hits:
            unmapped.append(key)
        elif len(hits) > 1:
            raise VituneError(f"{where}: key {key!r} matches several rules: {[r.pattern for r, _ in hits]}")
        else:
            out[key] = hits[0][1]
    if unmapped:
        raise VituneError(f"{where}: {len(unmapped)} weight(s) have no mapping in this layout: {sorted(unmapped)[:8]}")
    seen: dict[str, str] = {}
    for src, dst in out.items():
        if dst in seen:
            raise VituneError(f"{where}: keys {seen[dst]!r} and {src!r} both map to {dst!r}")
        seen[dst] = src
    return out


def tower_inner_prefix(tower: nn.Module) -> str:
    """'vision_model.' when the tower class nests its weights under it (transformers < 5), else ''."""
    keys = list(tower.state_dict())
    return "vision_model." if keys and all(k.startswith("vision_model.") for k in keys) else ""


def export_rules(inner: str) -> list[KeyRule]:
    """vitune names -> the hub's LLaVA names (`llava-hf/*`)."""
    return [
        KeyRule(rf"vision\.tower\.{re.escape(inner)}(.+)", r"vision_tower.vision_model.\1"),
        KeyRule(r"projector\.0\.(weight|bias)", r"multi_modal_projector.linear_1.\1"),
        KeyRule(r"projector\.2\.(weight|bias)", r"multi_modal_projector.linear_2.\1"),
        KeyRule(r"language_model\.(.+)", r"language_model.\1"),
    ]


def import_rules(inner: str, lm_base: str) -> list[KeyRule]:
    """transformers' LLaVA names (hub names and module names) -> vitune names.

    `inner` is our tower's own prefix (see `tower_inner_prefix`), `lm_base` our causal LM's
    `base_model_prefix` (where transformers' `model.language_model` lives inside it)."""
    return [
        # hub names (llava-hf/*, and what `vitune export` writes)
        KeyRule(r"language_model\.(.+)", r"language_model.\1"),
        KeyRule(r"vision_tower\.vision_model\.(.+)", rf"vision.tower.{inner}\1"),
        KeyRule(r"vision_tower\.(?!vision_model\.)(.+)", rf"vision.tower.{inner}\1"),
        KeyRule(r"multi_modal_projector\.linear_1\.(weight|bias)", r"projector.0.\1"),
        KeyRule(r"multi_modal_projector\.linear_2\.(weight|bias)", r"projector.2.\1"),
        # module names (LlavaForConditionalGeneration.state_dict() since transformers 4.52)
        KeyRule(r"model\.language_model\.(.+)", rf"language_model.{lm_base}.\1"),
        KeyRule(r"lm_head\.(.+)", r"language_model.lm_head.\1"),
        KeyRule(r"model\.vision_tower\.vision_model\.(.+)", rf"vision.tower.{inner}\1"),
        KeyRule(r"model\.vision_tower\.(?!vision_model\.)(.+)", rf"vision.tower.{inner}\1"),
        KeyRule(r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"projector.0.\1"),
        KeyRule(r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"projector.2.\1"),
    ]


# -- weights files ----------------------------------------------------------------------------
def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or, failing that,
    `pytorch_model*.bin` read with `weights_only=True` (tensors only, never arbitrary pickles)."""
    from safetensors.torch import load_file

    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        files: list[Path] = []
        if (directory / single).is_file():
            files = [directory / single]
        elif (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise VituneError(f"{directory / index}: not a weights index ({err})") from None
            files = [directory / name for name in sorted(set(weight_map.values()))]
        if not files:
            continue
        state: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise VituneError(f"{f}: listed in the weights index but missing")
            state.update(load_file(str(f)) if f.suffix == ".safetensors" else load_torch_weights(f))
        return state
    raise VituneError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def load_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise VituneError(f"{path}: cannot read as a tensors-only checkpoint (weights_only=True): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise VituneError(f"{path}: expected a flat {{name: tensor}} state dict")
    return state


def checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating-point weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def resolve_dtype(name: str, state: dict[str, torch.Tensor]) -> torch.dtype:
    if name == "auto":
        return checkpoint_dtype(state)
    if name not in DTYPES:
        raise VituneError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# -- shared assembly for imports --------------------------------------------------------------
def grow_vocab(language_model: nn.Module, size: int) -> None:
    """Resize the LLM's embeddings to `size`; new rows are the mean of the old ones, so a new
    token's logit is the mean logit (never the argmax) and the result is deterministic."""
    old = language_model.get_input_embeddings().num_embeddings
    if size <= old:
        return
    language_model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        emb = language_model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        head = language_model.get_output_embeddings()
        if head is not None and head.weight is not emb:
            head.weight[old:] = head.weight[:old].mean(0)
            if getattr(head, "bias", None) is not None:
                head.bias[old:] = head.bias[:old].mean()


def prepare_tokenizer_for(language_model: nn.Module, tokenizer: Any, template: str) -> Any:
    """Give the tokenizer what the template and `<image>` need; grow the embeddings to match."""
    from vitune.model.build import prepare_tokenizer

    tokenizer = prepare_tokenizer(tokenizer, template)
    grow_vocab(language_model, len(tokenizer))
    return tokenizer


def _causal_lm(text_config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(text_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise VituneError("text_config has no model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def split_parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """vitune-named weights grouped by part, with the part's prefix removed."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision.tower.": {}, "projector.": {}, "language_model.": {}}
    for key, value in state.items():
        prefix = next(p for p in parts if key.startswith(p))
        parts[prefix][key[len(prefix):]] = value
    return parts


# -- chat template ----------------------------------------------------------------------------
_CONTENT_MACRO = r"""{%- macro content_text(content) -%}
{%- if content is string -%}{{ content }}{%- else -%}
{%- set parts = namespace(items=[]) -%}
{%- for part in content -%}
{%- if part['type'] == 'text' -%}
{%- if part['text'] is defined and part['text'] -%}{%- set parts.items = parts.items + [part['text']] -%}{%- endif -%}
{%- elif part['type'] in ['image', 'image_url', 'input_image'] -%}{%- set parts.items = parts.items + ['<image>'] -%}
{%- else -%}{{ raise_exception('unsupported content part type: ' ~ part['type']) }}{%- endif -%}
{%- endfor -%}
{{- parts.items | join('\n') -}}
{%- endif -%}
{%- endmacro -%}
"""


def _jinja_expr(fmt: str, **fields: str) -> str:
    """A Python format string of our templates as a Jinja expression; `fields` name the Jinja
    expressions that replace `{name}` (`bos`/`eos` are the tokenizer's special tokens)."""
    names = {"bos": "bos_token", "eos": "eos_token", **fields}
    pieces: list[str] = []
    for literal, field, _spec, _conv in string.Formatter().parse(fmt):
        if literal:
            pieces.append(json.dumps(literal, ensure_ascii=False))
        if field is not None:
            if field not in names:
                raise VituneError(f"template field {{{field}}} has no Jinja equivalent")
            pieces.append(f"({names[field]} or '')")
    return " ~ ".join(pieces) if pieces else "''"


def _literal(text: str) -> str:
    """`text` as a format string that renders to itself (our answer_prefix is not a format string)."""
    return text.replace("{", "{{").replace("}", "}}")


def chat_template_jinja(template_name: str, tokenizer: Any) -> str:
    """A Jinja chat template that renders exactly what `vitune.templates` renders for `template_name`.

    Message content may be a string with `<image>` markers or a list of parts
    (`{"type": "image"}`, `{"type": "text", "text": ...}`), as transformers' processors pass it;
    image parts become `<image>` lines, as in vitune. Assistant text is wrapped in
    `{% generation %}` so `return_assistant_tokens_mask` marks what vitune supervises."""
    template = get_template(template_name)
    if isinstance(template, HFTemplate):
        if not getattr(tokenizer, "chat_template", None):
            raise VituneError("template 'hf' needs the tokenizer's own chat_template, and this tokenizer has none")
        return str(tokenizer.chat_template)
    assert isinstance(template, Template)
    t = template
    system_head = bool(t.system_format) and not t.first_user_format
    lines = [
        f"{{#- vitune chat template {t.name!r}: generated from vitune.templates, renders what vitune trains on -#}}",
        _CONTENT_MACRO,
        f"{{%- set conv = namespace(system={json.dumps(t.system, ensure_ascii=False)}, messages=messages) -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set conv.system = content_text(messages[0]['content']) -%}",
        "{%- set conv.messages = messages[1:] -%}",
        "{%- endif -%}",
        f"{{{{- {_jinja_expr(t.prefix)} -}}}}",
    ]
    if system_head:
        lines.append(f"{{%- if conv.system -%}}{{{{- {_jinja_expr(t.system_format, content='conv.system')} -}}}}{{%- endif -%}}")
    lines += [
        "{%- for message in conv.messages -%}",
        "{%- set content = content_text(message['content']) -%}",
        "{%- if message['role'] == 'user' -%}",
    ]
    if t.user_images_only:  # `plain`: the human turn is reduced to its image markers
        lines.append("{%- set content = '<image>' * content.count('<image>') -%}")
    plain_user = (
        f"{{%- if not loop.first -%}}{{{{- {_jinja_expr(t.round_prefix)} -}}}}{{%- endif -%}}"
        f"{{{{- {_jinja_expr(t.user_format, content='content')} -}}}}"
    )
    if t.first_user_format:
        lines.append(
            f"{{%- if loop.first and conv.system -%}}{{{{- {_jinja_expr(t.first_user_format, content='content', system='conv.system')} -}}}}"
            f"{{%- else -%}}{plain_user}{{%- endif -%}}"
        )
    else:
        lines.append(plain_user)
    lines += [
        f"{{%- if not loop.last or add_generation_prompt -%}}{{{{- {_jinja_expr(t.assistant_header)} -}}}}{{%- endif -%}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{%- generation -%}}{{{{- {_jinja_expr(_literal(t.answer_prefix) + '{content}' + t.assistant_end, content='content')} -}}}}{{%- endgeneration -%}}",
    ]
    if t.turn_sep:
        lines.append(f"{{{{- {_jinja_expr(t.turn_sep)} -}}}}")
    lines += [
        "{%- else -%}{{ raise_exception('roles must be system (first), user and assistant; got ' ~ message['role']) }}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines)


def render_segments(template_name: str, messages: Sequence[Any], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """What vitune's template renders for `messages` (the text the Jinja template must equal)."""
    from vitune.templates import normalize_conversation

    template = get_template(template_name)
    normalized = normalize_conversation(list(messages), "conversation")
    return "".join(text for text, _ in template.segments(normalized, tokenizer, add_generation_prompt))


# -- export -----------------------------------------------------------------------------------
def adapter_dir(model_dir: Path) -> Path | None:
    """The LoRA adapter `model_dir` is (peft's adapter_config.json) or holds as a LoRA run (`lora/`),
    when it is not itself a full model; None for a full model. A full model directory that also
    holds adapter files is ambiguous (merged or not?) and refused."""
    found = [name for name in ADAPTER_FILES if (model_dir / name).exists()]
    if (model_dir / "config.json").is_file():
        if found:
            raise VituneError(
                f"{model_dir}: a model directory that also holds LoRA adapter files ({', '.join(found)}); the LLaVA "
                f"layout has no place for an adapter. Merge it (`vitune merge-lora --adapter ... --out DIR`) and export DIR"
            )
        return None
    if found:
        return model_dir
    if (model_dir / "lora" / "adapter_config.json").is_file():
        return model_dir
    return None


def _merge_adapter(adapter: Path, scratch: Path) -> Path:
    """Merge a LoRA adapter (or run) into its recorded base, as `vitune merge-lora` does."""
    from vitune.train.lora import merge_lora

    return merge_lora(None, adapter, scratch / "merged")


def feature_strategy(config: LlavaConfig) -> tuple[str, int]:
    """(vision_feature_select_strategy, num_additional_image_tokens) for transformers' LLaVA.

    transformers' "default" drops the first token unconditionally, so it is right only when the
    tower has a CLS token and we drop it (`patch`); everything else keeps all tokens ("full")."""
    strategy = "default" if (config.vision_has_cls and config.vision_feature_select == "patch") else "full"
    return strategy, 1 if config.vision_has_cls else 0


def hf_image_processor_dict(processor: LlavaProcessor) -> dict[str, Any]:
    """`LlavaImageProcessor` settings reproducing our preprocessing: the encoder's own resize /
    crop / normalisation, after LLaVA-1.5's pad-to-square (`do_pad`) when the model pads."""
    ip = processor.image_processor
    side = processor.image_size

    def plain(value: Any) -> Any:
        if hasattr(value, "items"):
            return {k: v for k, v in value.items() if v is not None}
        if hasattr(value, "__dataclass_fields__"):
            return {k: getattr(value, k) for k in value.__dataclass_fields__ if getattr(value, k) is not None}
        return value

    out: dict[str, Any] = {"image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor"}
    for key in ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb"):
        value = getattr(ip, key, None)
        if value is not None:
            value = plain(value)
            out[key] = [float(v) for v in value] if key in ("image_mean", "image_std") else value
    if hasattr(out.get("resample"), "value"):
        out["resample"] = int(out["resample"].value)
    if not out.get("do_center_crop"):
        # LlavaProcessor counts image tokens from crop_size; without a crop the image is side x side.
        out["do_center_crop"] = False
        out["crop_size"] = {"height": side, "width": side}
    out["do_pad"] = processor.config.image_aspect_ratio == "pad"
    return out


def export_hf(model_dir: str | Path, out_dir: str | Path, max_shard_size: int = 5 * 1024**3) -> Path:
    """Write `model_dir` (a vitune model) as a transformers `LlavaForConditionalGeneration` directory.

    A LoRA adapter or LoRA run directory is merged into its recorded base model first (the
    layout has no adapters), exactly as `vitune merge-lora` would."""
    import tempfile

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter = adapter_dir(model_dir)
    if adapter is None:
        return _export_hf(model_dir, out_dir, max_shard_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.merge-", dir=out_dir.parent) as scratch:
        return _export_hf(_merge_adapter(adapter, Path(scratch)), out_dir, max_shard_size)


def _export_hf(model_dir: Path, out_dir: Path, max_shard_size: int) -> Path:
    from transformers import GenerationConfig
    from transformers import LlavaConfig as HFLlavaConfig

    config = LlavaConfig.load(model_dir)
    if config.projector != HF_PROJECTOR:
        raise VituneError(
            f"{model_dir}: projector {config.projector!r} has no equivalent in transformers' LLaVA layout, which only "
            f"has {HF_PROJECTOR!r} (Linear -> GELU -> Linear); export needs a model built with --projector {HF_PROJECTOR}"
        )
    vision_type = config.vision_config.get("model_type")
    if vision_type not in HF_VISION_MODEL_TYPES:
        raise VituneError(f"{model_dir}: vision tower {vision_type!r} is not exportable; supported: {', '.join(HF_VISION_MODEL_TYPES)}")
    processor = LlavaProcessor.from_pretrained(model_dir, config)
    tokenizer = processor.tokenizer
    state = load_state_dict(model_dir)

    with torch.device("meta"):  # structure only: nothing is allocated
        tower = vision_tower_from_config(config.vision_config)
        lm_base = _causal_lm(config.text_config).base_model_prefix
    inner = tower_inner_prefix(tower)
    mapping = remap(state, export_rules(inner), where=str(model_dir))
    hf_state = {mapping[k]: v for k, v in state.items()}

    strategy, additional = feature_strategy(config)
    patch = int(config.vision_config.get("patch_size") or 0)
    side = processor.image_size
    hf_count = (side // patch) ** 2 + additional - (1 if strategy == "default" else 0) if patch else -1
    if hf_count != config.num_image_tokens:
        raise VituneError(
            f"{model_dir}: transformers' LlavaProcessor would expand <image> to {hf_count} tokens "
            f"(image {side}px, patch {patch}), but this model uses {config.num_image_tokens}"
        )
    tied = bool(config.text_config.get("tie_word_embeddings", False))
    hf_config = HFLlavaConfig(
        vision_config=dict(config.vision_config),
        text_config=dict(config.text_config),
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    hf_config.architectures = ["LlavaForConditionalGeneration"]
    hf_config.dtype = checkpoint_dtype(state)
    check_against_transformers(hf_config, hf_state, inner, lm_base, where=str(model_dir))

    chat_template = chat_template_jinja(config.template, tokenizer)
    eos_ids = sorted(processor.eos_token_ids())
    with atomic_dir(out_dir) as tmp:
        hf_config.save_pretrained(str(tmp))
        save_state_dict(hf_state, tmp, max_shard_size)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(str(tmp))
        _save_processor(tmp, processor, tokenizer, chat_template, patch, strategy, additional)
        atomic_write_json(tmp / EXPORT_INFO_NAME, {"template": config.template, "image_aspect_ratio": config.image_aspect_ratio,
                                                   "vision_feature_select": config.vision_feature_select})
    return out_dir


def _save_processor(directory: Path, processor: LlavaProcessor, tokenizer: Any, chat_template: str, patch: int, strategy: str, additional: int) -> None:
    """Tokenizer (with the chat template), preprocessor and processor configs, written by
    transformers' own LlavaProcessor so its loader reads them back as it wrote them."""
    import copy

    from transformers import AutoImageProcessor
    from transformers import LlavaProcessor as HFLlavaProcessor

    atomic_write_json(directory / "preprocessor_config.json", hf_image_processor_dict(processor))
    image_processor = AutoImageProcessor.from_pretrained(str(directory))
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = chat_template
    hf_processor = HFLlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch, vision_feature_select_strategy=strategy,
        chat_template=chat_template, image_token=IMAGE_MARKER, num_additional_image_tokens=additional,
    )
    hf_processor.save_pretrained(str(directory))
    make_portable(directory, hf_image_processor_dict(processor), chat_template)


def make_portable(directory: Path, image_processor: dict[str, Any], chat_template: str) -> None:
    """Rewrite transformers 5's processor files in the forms the hub's llava-hf checkpoints use,
    which transformers 4.x (and so most vLLM / SGLang installs) read as well as 5.x does:
    a flat processor_config.json, the portable image-processor and tokenizer class names, the
    tokenizer's extra tokens as `additional_special_tokens`, and the chat template both as
    chat_template.jinja and in the legacy places (chat_template.json, tokenizer_config.json)."""
    atomic_write_json(directory / "preprocessor_config.json", image_processor)
    proc_path = directory / "processor_config.json"
    proc = json.loads(proc_path.read_text()) if proc_path.is_file() else {}
    proc = {k: v for k, v in proc.items() if k not in ("image_processor", "tokenizer")}
    atomic_write_json(proc_path, proc)
    tok_path = directory / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tok.get("extra_special_tokens")
    if isinstance(extra, list):
        tok.pop("extra_special_tokens")
        tok["additional_special_tokens"] = extra
    tok["chat_template"] = chat_template
    atomic_write_json(tok_path, tok)
    atomic_write_json(directory / "chat_template.json", {"chat_template": chat_template})


def check_against_transformers(hf_config: Any, hf_state: dict[str, torch.Tensor], inner: str, lm_base: str, where: str) -> None:
    """The exported names and shapes are exactly what transformers' LlavaForConditionalGeneration
    holds: both are mapped to vitune names through the import table and compared (on the meta
    device, so nothing is allocated)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        reference = LlavaForConditionalGeneration(hf_config)
    expected_src = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    rules = import_rules(inner, lm_base)
    expected = {dst: expected_src[src] for src, dst in remap(expected_src, rules, where="transformers' LlavaForConditionalGeneration").items()}
    got = {dst: tuple(hf_state[src].shape) for src, dst in remap(hf_state, rules, where=where).items()}
    if hf_config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)
        got.pop("language_model.lm_head.weight", None)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise VituneError(f"{where}: exported weights do not match transformers' LLaVA: missing {missing[:8]}, unexpected {extra[:8]}")
    bad = [f"{k}: {got[k]} vs {expected[k]}" for k in expected if got[k] != expected[k]]
    if bad:
        raise VituneError(f"{where}: exported shapes differ from transformers' LLaVA: {bad[:8]}")


# -- import -----------------------------------------------------------------------------------
def import_hf(
    src: str | Path,
    out: str | Path,
    template: str | None = None,
    image_aspect_ratio: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """A transformers `LlavaForConditionalGeneration` directory -> a vitune model directory."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers import LlavaConfig as HFLlavaConfig

    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise VituneError(f"{src}: no config.json")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        raise VituneError(f"{cfg_path}: this is the original LLaVA release layout (mm_* keys); use --format original")
    if raw.get("model_type") != "llava":
        raise VituneError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, not 'llava' (transformers' LlavaForConditionalGeneration)")
    hf_cfg = HFLlavaConfig.from_pretrained(str(src))
    if hf_cfg.projector_hidden_act != "gelu" or not hf_cfg.multimodal_projector_bias:
        raise VituneError(
            f"{cfg_path}: projector_hidden_act={hf_cfg.projector_hidden_act!r}, multimodal_projector_bias="
            f"{hf_cfg.multimodal_projector_bias}; vitune's {HF_PROJECTOR} needs 'gelu' with biases"
        )
    info_path = src / EXPORT_INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    template = template or info.get("template") or "vicuna_v1"

    state = read_weights(src)
    torch_dtype = resolve_dtype(dtype, state)
    tower = vision_tower_from_config(clean_config(hf_cfg.vision_config))
    has_cls = count_tokens(tower, int(hf_cfg.vision_config.image_size))[1]
    strategy = hf_cfg.vision_feature_select_strategy
    if strategy == "default" and not has_cls:
        raise VituneError(f"{cfg_path}: strategy 'default' drops a CLS token, but this vision tower has none")
    select = "patch" if (strategy == "default" or not has_cls) else "cls_patch"

    language_model = _causal_lm(clean_config(hf_cfg.text_config))
    rules = import_rules(tower_inner_prefix(tower), language_model.base_model_prefix)
    mapping = remap(state, rules, where=str(src))
    parts = split_parts({mapping[k]: v for k, v in state.items()})
    load_into(tower, parts["vision.tower."], where=f"{src} (vision tower)")
    load_into(language_model, parts["language_model."], where=f"{src} (language model)")
    language_model.tie_weights()

    tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    if tokenizer.convert_tokens_to_ids(IMAGE_MARKER) != hf_cfg.image_token_id or IMAGE_MARKER not in tokenizer.get_vocab():
        raise VituneError(
            f"{src}: the tokenizer's {IMAGE_MARKER} token is {tokenizer.get_vocab().get(IMAGE_MARKER)}, but config.json's "
            f"image_token_index is {hf_cfg.image_token_id}"
        )
    tokenizer = prepare_tokenizer_for(language_model, tokenizer, template)
    image_processor = AutoImageProcessor.from_pretrained(str(src))
    pads = bool(getattr(image_processor, "do_pad", False))
    if hasattr(image_processor, "do_pad"):
        image_processor.do_pad = False  # vitune's processor pads itself (image_aspect_ratio)
    model, processor = assemble(
        tower, language_model, tokenizer, image_processor, HF_PROJECTOR, hf_cfg.vision_feature_layer, select,
        image_aspect_ratio or ("pad" if pads else "crop"), template,
    )
    load_into(model.projector, parts["projector."], where=f"{src} (projector)")
    model = model.to(torch_dtype)
    model.save_pretrained(out, processor)
    return out
