"""The model side of a run: load it, apply the stage (freeze / LoRA / template), group parameters.

Which parts train is data (`stage.parts`: a learning rate or "frozen" for vision, projector and
LLM); `apply_stage` freezes what the config says, logs it, and returns one optimizer group per
trained part and per weight-decay class (matrices decay; biases and norm weights do not).
`TrainingModule` is what the optimizer and the distributed wrapper see: a forward that returns
the summed token loss of a micro-batch, from pixels or from cached vision features, computing
the vocabulary projection only at positions that have a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitune.errors import VituneError
from vitune.templates import IGNORE_INDEX, get_template
from vitune.train import label_positions
from vitune.train.config import FROZEN, Config

PARTS = ("vision", "projector", "llm")


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory whose `model/` is one."""
    path = Path(path)
    if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "model"
    if (path / "model" / "config.json").is_file() and (path / "config.yaml").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise VituneError(f"model.path {path}: not a vitune model directory (no config.json) nor a run directory (no model/)")
    return path


def resolve_projector_dir(path: str | Path) -> Path:
    """A projector directory (`projector_config.json`), or a run directory whose `projector/` is one."""
    path = Path(path)
    if (path / "projector" / "projector_config.json").is_file():
        return path / "projector"
    if not (path / "projector_config.json").is_file():
        raise VituneError(f"model.projector {path}: not a projector directory (no projector_config.json) nor a stage-1 run directory")
    return path


def load_for_training(config: Config) -> tuple[Any, Any]:
    """(LlavaModel, LlavaProcessor) in fp32 on the CPU, the stage-1 projector loaded, the template set."""
    from vitune.model.llava import LlavaModel
    from vitune.processor import LlavaProcessor

    model_dir = resolve_model_dir(config.model.path)
    model = LlavaModel.from_pretrained(model_dir)
    processor = LlavaProcessor.from_pretrained(model_dir, model.config)
    if config.model.projector:
        model.load_projector(resolve_projector_dir(config.model.projector))
    if config.stage.template:
        template = get_template(config.stage.template)
        missing = [t for t in template.special_tokens if t not in processor.tokenizer.get_vocab()]
        if missing:
            raise VituneError(f"stage.template {template.name!r} needs tokens {missing} that the model's tokenizer lacks; "
                              f"build the model with --template {template.name}")
        processor.template = template
    return model, processor


@dataclass
class PartPlan:
    name: str
    lr: float | None  # None: frozen
    params: int  # trainable parameter count


def apply_stage(model: Any, config: Config, compute_dtype: torch.dtype = torch.bfloat16) -> list[PartPlan]:
    """Freeze/unfreeze each part as `stage.parts` says, add LoRA when configured; returns the plan."""
    from vitune.train.lora import apply_lora

    parts_cfg = config.stage.parts
    lora = config.stage.lora
    for part, module in model.parts().items():
        lr = getattr(parts_cfg, part)
        trainable = lr != FROZEN and not (part == "llm" and lora is not None)
        module.requires_grad_(trainable)
    if lora is not None:
        apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.bits,
                   config.model.gradient_checkpointing, compute_dtype)
    if config.model.gradient_checkpointing:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        model.language_model.gradient_checkpointing_enable(**kwargs)
        if parts_cfg.vision != FROZEN and hasattr(model.vision.tower, "gradient_checkpointing_enable"):
            model.vision.tower.gradient_checkpointing_enable(**kwargs)
    model.language_model.config.use_cache = False
    plan = []
    for part, module in model.parts().items():
        lr = getattr(parts_cfg, part)
        n = sum(p.numel() for p in module.parameters() if p.requires_grad)
        plan.append(PartPlan(part, None if lr == FROZEN else float(lr), n))
    return plan


def set_train_modes(model: Any, gradient_checkpointing: bool = False) -> None:
    """Trained parts in train mode; fully frozen ones in eval mode (no dropout in what does not
    learn), except a frozen LLM with gradient checkpointing: transformers checkpoints only in train
    mode, and stage 1 still backpropagates through the LLM to the projector."""
    for name, module in model.parts().items():
        trains = any(p.requires_grad for p in module.parameters())
        module.train(trains or (name == "llm" and gradient_checkpointing))


def param_groups(model: Any, plan: list[PartPlan], weight_decay: float) -> list[dict[str, Any]]:
    """One group per (trained part, decays?); `base_lr` is the part's lr before the schedule."""
    groups = []
    parts = model.parts()
    for p in plan:
        if p.lr is None:
            continue
        decay, no_decay = [], []
        for param in parts[p.name].parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
        for params, wd, suffix in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": p.lr, "base_lr": p.lr, "weight_decay": wd, "name": f"{p.name}/{suffix}"})
    if not groups:
        raise VituneError("no parameter requires training (check stage.parts)")
    return groups


def _decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The LM's decoder stack and output head when logits are plainly head(hidden); None otherwise."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


class TrainingModule(nn.Module):
    """Wraps LlavaModel for training: forward -> summed cross-entropy over the label tokens."""

    def __init__(self, llava: nn.Module, compile_decoder: bool = False) -> None:
        super().__init__()
        self.llava = llava
        # Kept out of the module tree (a plain dict), so state_dict, parameters() and DDP see the
        # decoder's weights once, under their own names.
        self._compiled: dict[int, nn.Module] = {}
        self._compiled_at_labels: Any = None
        self.compile_decoder = compile_decoder

    def _decoder(self, decoder: nn.Module) -> nn.Module:
        if not self.compile_decoder:
            return decoder
        if id(decoder) not in self._compiled:
            # Sequence lengths change every step: one graph with a symbolic length, not one per length.
            self._compiled[id(decoder)] = torch.compile(decoder, dynamic=True)
        return self._compiled[id(decoder)]

    def _at_labels(self) -> Any:
        if not self.compile_decoder:
            return label_positions.decoder_at_labels
        if self._compiled_at_labels is None:
            self._compiled_at_labels = torch.compile(label_positions.decoder_at_labels, dynamic=True)
        return self._compiled_at_labels

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed cross-entropy over the label tokens; with `sample_weights` ([batch]) each row's
        tokens are scaled by its weight before the sum."""
        llava = self.llava
        image_features = None
        if vision_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            vision = llava.vision
            if any(p.requires_grad for p in vision.parameters()):
                vision_features = vision(pixel_values.to(dtype=next(vision.parameters()).dtype))
            else:
                with torch.no_grad():
                    vision_features = vision(pixel_values.to(dtype=next(vision.parameters()).dtype))
        if vision_features is not None:
            proj_dtype = next(llava.projector.parameters(), vision_features).dtype
            image_features = llava.projector(vision_features.to(proj_dtype))
        embeds = llava.embed(input_ids, image_features=image_features)
        unused = None
        if image_features is None:
            # A text-only micro-batch leaves the projector (and a trained vision tower) out of the graph;
            # DDP would wait for their gradients forever. A zero-weighted term keeps them in.
            idle = [p for m in (llava.projector, llava.vision) for p in m.parameters() if p.requires_grad]
            if idle:
                unused = sum(p.sum() for p in idle) * 0.0
        targets = labels[:, 1:]
        lm = llava.language_model
        split = _decoder_and_head(lm)
        keep = targets != IGNORE_INDEX
        if split is None:
            logits = lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
        elif label_positions.supported(split[0], embeds.shape[1]):
            # The last layer, the norm and the head only where a label is predicted.
            decoder, head = split
            positions, flat = label_positions.label_slots(keep)
            logits = head(self._at_labels()(decoder, embeds, attention_mask, positions, flat))
        else:
            decoder, head = split
            hidden = self._decoder(decoder)(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
            # Only positions that predict a label go through the vocabulary projection.
            logits = head(hidden[:, :-1][keep])
        if sample_weights is None:
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        else:
            per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")
            rows = keep.nonzero(as_tuple=True)[0]
            loss = (per_token * sample_weights.to(per_token.dtype)[rows]).sum()
        return loss if unused is None else loss + unused
