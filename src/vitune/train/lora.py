"""LoRA and QLoRA on the LLM (peft), and merging adapters back into a full model.

The adapters wrap `model.language_model` only; the vision tower and projector keep their names.
A LoRA run saves the adapter in peft's own layout (`lora/`: adapter_config.json,
adapter_model.safetensors) plus `vitune_lora.json` (base model, projector, template), and its
`model/` is the merged model. `merge_lora` rebuilds that merged model from a base directory, an
adapter and a projector, for adapters saved by a run or shared on their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitune.errors import VituneError
from vitune.io import atomic_dir, atomic_write_json

LORA_META = "vitune_lora.json"


def check_qlora_available() -> None:
    """QLoRA needs CUDA and a working bitsandbytes: say so plainly rather than fail deep inside."""
    if not torch.cuda.is_available():
        raise VituneError("QLoRA (stage.lora.bits=4) needs a CUDA GPU and bitsandbytes; on this machine use "
                          "stage.lora.bits=16 (plain LoRA)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # bitsandbytes raises assorted errors when its CUDA libraries are missing
        raise VituneError(f"QLoRA (stage.lora.bits=4) needs bitsandbytes: `pip install bitsandbytes` ({err})") from None


def quantize_4bit(lm: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace the LLM's linear layers (not the output head) by NF4 `Linear4bit`; they quantize on `.cuda()`."""
    import bitsandbytes as bnb

    head = lm.get_output_embeddings()
    for module in list(lm.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not head:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
    lm.cuda()


def apply_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: list[str], bits: int = 16,
               gradient_checkpointing: bool = False, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Wrap `model.language_model` in peft LoRA adapters (trainable); its own weights freeze."""
    from peft import LoraConfig, get_peft_model

    if bits == 4:
        check_qlora_available()
        from peft import prepare_model_for_kbit_training

        quantize_4bit(model.language_model, compute_dtype)
        model.language_model = prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=gradient_checkpointing)
    targets: str | list[str] = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model.language_model = get_peft_model(model.language_model, config)


def is_lora(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def merge_into(model: Any) -> None:
    """Fold the adapters into the LLM's weights in place; the model is plain again."""
    if is_lora(model):
        model.language_model = model.language_model.merge_and_unload()


def save_adapter(model: Any, directory: str | Path, meta: dict[str, Any]) -> None:
    """peft's adapter files plus vitune's note of what they apply to, atomically."""
    with atomic_dir(directory) as tmp:
        model.language_model.save_pretrained(str(tmp))
        atomic_write_json(tmp / LORA_META, meta)


def merge_lora(base: str | Path | None, adapter: str | Path, out: str | Path, projector: str | Path | None = None,
               template: str | None = None) -> Path:
    """A full model directory from a base model, a LoRA adapter and (optionally) a projector.

    `adapter` may be a LoRA directory or a LoRA run directory (its `lora/` and `projector/` are used,
    and its recorded base model when `base` is None).
    """
    from peft import PeftModel

    from vitune.model.llava import LlavaModel
    from vitune.processor import LlavaProcessor
    from vitune.templates import get_template

    adapter = Path(adapter)
    if (adapter / "lora").is_dir():
        if projector is None and (adapter / "projector").is_dir():
            projector = adapter / "projector"
        adapter = adapter / "lora"
    if not (adapter / "adapter_config.json").is_file():
        raise VituneError(f"{adapter}: no adapter_config.json (not a LoRA adapter directory)")
    meta: dict[str, Any] = {}
    if (adapter / LORA_META).is_file():
        meta = json.loads((adapter / LORA_META).read_text(encoding="utf-8"))
    if base is None:
        base = meta.get("base_model")
        if not base:
            raise VituneError(f"{adapter}: no base model recorded; pass --base")
    base = Path(base)
    model = LlavaModel.from_pretrained(base)
    processor = LlavaProcessor.from_pretrained(base, model.config)
    if projector is not None:
        model.load_projector(projector)
    elif meta.get("projector_in_adapter"):
        raise VituneError(f"{adapter}: the run trained the projector; pass its projector directory (--projector)")
    model.language_model = PeftModel.from_pretrained(model.language_model, str(adapter)).merge_and_unload()
    template = template or meta.get("template")
    if template and template != model.config.template:
        model.config.template = template
        processor.template = get_template(template)
    model.save_pretrained(out, processor)
    return Path(out)
