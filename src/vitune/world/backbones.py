"""Stand-in "pretrained" backbones for the synthetic world: a tokenizer, a CLIP and a Llama LM.

Real LLaVA starts from OpenAI's CLIP and Vicuna; neither can be downloaded here, so
`make_backbones` makes small ones from a rendered world, in the Hugging Face layout, so they
load exactly like real checkpoints:

    B/tokenizer/   the LM tokenizer (byte-level BPE, `<s>` prepended)      -> AutoTokenizer
    B/clip/        CLIPModel + CLIPProcessor (image processor + tokenizer) -> CLIPModel, CLIPVisionModel
    B/lm/          LlamaForCausalLM + the LM tokenizer                     -> LlamaForCausalLM, AutoTokenizer
    B/report.json  configs, training figures and quality gauges

The story, step by step (each with a progress bar and its figures printed):
1. tokenizer: trained on the world's text (`corpus.py`) and every chat template's words;
2. CLIP, in two phases. Phase 1 (30% of its time), region pretraining: the vision tower's
   penultimate-layer patch tokens, pooled over each object's box, must name the object's shape,
   colour, size and 3x3 place through a linear head (supervised pretraining on the world's
   boxes, as detection-pretrained backbones are; the head is discarded afterwards, as MAE's
   decoder is). That is the layer and the tokens LLaVA reads, so shape lands where it is used;
   it is also cheap (no text tower). Phase 2, CLIP's symmetric InfoNCE on image-caption pairs
   with NegCLIP hard negatives -- for every image one extra caption that differs from a true one
   only in one object's shape, colour or place, or one flipped relation -- so batches cannot be
   told apart by colour and count alone; the region loss stays on. Without phase 1 (measured:
   same budget, same machine) the shape probe stayed at 0.46-0.72;
3. gauges: image-to-caption retrieval among held-out scenes, hard-negative choice, linear probes
   on the penultimate patch features (against a randomly initialised tower of the same shape);
4. LM: causal LM pretraining on packed documents of the world's text; held-out perplexity, and
   in-context reading: the short-answer questions answered from a scene's text description
   (`probes.text_qa`), the skill stage 2 has to turn onto image tokens.

With two or more threads the LM trains in a second process beside the CLIP (one thread each
does more than both on one phase for models this small); with one, after it.

Training runs against a time budget (`--seconds`, split across the steps): the learning rate
follows warm-up and cosine decay over the fraction of the step's budget spent, so a run ends on
a decayed rate whatever the machine's speed. Figures therefore vary between machines, and on a
busy one. `--steps clip=N,lm=N,chat=N` fixes a phase's optimizer steps instead (the schedule then
follows the steps taken): the same backbones on any machine, for tests and like-for-like runs.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vitune.cpu import flush_subnormals, job_threads
from vitune.errors import VituneError
from vitune.io import atomic_dir, atomic_write_json
from vitune.world.scene import COLORS, SHAPES, SIZES, Scene, position_phrase, read_scenes

# CLIP's own normalisation, so the saved image processor is the stock one.
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
RETRIEVAL_SCENES = 256
PROBE_TEST_SCENES = 500
NEGATIVE_KIND_WEIGHTS: dict[str, float] = {"shape": 0.5, "position": 0.3, "color": 0.2}
TEXT_MAX_LENGTH = 64
# The LM's share of the budget left for its gauges (perplexity, reading questions from text), and
# how many test scenes the reading gauge asks about (~6 questions each, every choice scored).
LM_GAUGE_RESERVE = 0.04
TEXT_QA_SCENES = 40
# Region loss weights for shape, colour, size, position: shape is the slow one to learn (colour
# is a pixel average; position is in the position embeddings), so it gets the most gradient.
ATTRIBUTE_WEIGHTS: tuple[float, ...] = (2.0, 0.5, 0.5, 1.0)


@dataclass(frozen=True)
class Budget:
    """How long one training phase runs: `seconds` of wall time, or exactly `steps` optimizer
    steps when given (machine-independent)."""

    seconds: float
    steps: int | None = None
    visible: bool = True  # False: no progress bar (a phase running beside another one's bar)

    def spent(self, elapsed: float, step: int) -> float:
        """The fraction of the budget used after `step` steps in `elapsed` seconds (done at 1)."""
        return step / self.steps if self.steps is not None else elapsed / self.seconds

    def bar(self, desc: str) -> Any:
        from tqdm import tqdm

        unit = "step" if self.steps is not None else "s"
        total = self.steps if self.steps is not None else round(self.seconds)
        return tqdm(total=total, desc=desc, unit=unit, disable=None if self.visible else True, bar_format="{l_bar}{bar}| {n:.0f}/{total}" + unit + " {postfix}")

    def show(self, bar: Any, elapsed: float, step: int) -> None:
        bar.n = step if self.steps is not None else min(round(elapsed), round(self.seconds))


STEP_PHASES: tuple[str, ...] = ("clip", "lm", "chat")


def parse_steps(text: str | None) -> dict[str, int]:
    """`clip=600,lm=400` -> {"clip": 600, "lm": 400}, with errors naming the bad part."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in STEP_PHASES or not value.strip().isdigit() or int(value) < 1:
            raise VituneError(f"--steps: bad part {part!r} (want PHASE=N with PHASE one of {', '.join(STEP_PHASES)} and N >= 1)")
        out[name] = int(value)
    return out


@dataclass(frozen=True)
class Preset:
    """Model sizes and schedule of one backbone preset; time shares split `seconds`."""

    seconds: float  # default total budget
    vocab_size: int
    # CLIP
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    projection_dim: int
    clip_batch: int
    clip_lr: float
    region_weight: float  # weight of the region-phrase loss (0 turns it off)
    # LM
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_context: int
    lm_batch: int
    lm_lr: float
    lm_scenes: int  # training scenes whose text the LM reads (more than it can read in time is waste)
    # "adamw", or "muon": Muon for the LM's hidden matrices, AdamW for its (tied) embeddings and
    # norms (`vitune.train.optim`), both at `lm_lr` and its schedule
    lm_optimizer: str = "adamw"
    # Chat tuning after pretraining (Vicuna is LLaMA tuned on conversations): this share of the LM's
    # time goes to question-answer chats about scenes' text, with the loss on the answers only.
    chat_share: float = 0.0
    chat_batch: int = 32
    chat_lr: float = 1e-3
    # The text tower only serves pretraining (LLaVA keeps the vision tower), so it is kept lean.
    text_mlp_ratio: int = 2
    # Budget split: of what is left after the tokenizer, CLIP training gets this share; the
    # LM gets the rest minus the evaluation reserve.
    clip_share: float = 0.75
    # Share of the CLIP budget spent on region-only steps before contrastive training.
    region_phase: float = 0.3
    eval_reserve: float = 0.06
    probe_scenes: int = 500  # val scenes the probes are fitted on


PRESETS: dict[str, Preset] = {
    # Trains in seconds inside the test suite; beats chance, nothing more.
    "quick": Preset(
        seconds=20, vocab_size=400,
        patch_size=12, vision_hidden=64, vision_layers=2, vision_heads=2,
        text_hidden=64, text_layers=1, text_heads=2, projection_dim=64, clip_batch=32, clip_lr=3e-3, region_weight=1.0,
        lm_hidden=64, lm_layers=1, lm_heads=2, lm_context=128, lm_batch=8, lm_lr=3e-3, lm_scenes=300,
        probe_scenes=100, clip_share=0.85, chat_share=0.2,
    ),  # fmt: skip
    # The embedded default: the demo's backbones, ~4 minutes on 2 CPU cores. 48 px images with
    # 16 px patches: 9 image tokens for LLaVA, one per cell of the world's 3x3 layout grid, so each
    # token holds (most of) one object. Measured against 12 px patches (16 tokens that cut objects
    # apart), same 140 s: retrieval 0.82 vs 0.76 (more CLIP steps), shorter stage-2 sequences.
    "tiny": Preset(
        seconds=240, vocab_size=1024,
        patch_size=16, vision_hidden=128, vision_layers=4, vision_heads=4,
        text_hidden=96, text_layers=2, text_heads=4, projection_dim=128, clip_batch=64, clip_lr=2e-3, region_weight=1.0,
        # Three layers of 96 (3 heads of 32), not two of 128: about the same FLOPs per token
        # (0.33M against 0.39M weights in the layers), and relation, the one question that needs
        # two look-ups and a comparison, learned within the demo's stage 2 in 6 of 7 time-budgeted
        # demos where two layers had learned it in 10 of 14 (seeds 3 and 6 failing on it); the
        # third layer at 128 cost 1.5x per step and did not fit the budget (docs/demo-notes.md)
        lm_hidden=96, lm_layers=3, lm_heads=3, lm_context=256, lm_batch=8, lm_lr=3e-3, lm_scenes=6000,
        # Muon, not AdamW: in the same 780 steps the LM's loss fell to 0.48 instead of 0.61
        # (held-out perplexity 1.66 against 1.86), and stage 2 binds on it (docs/demo-notes.md)
        lm_optimizer="muon",
        # CLIP and LM about equal time: the LM's pretraining steps decide whether stage 2 learns to
        # find the object a question names (LM of 537 steps: toy-vqa 0.52-0.54; 1,000-1,600: mostly
        # 0.70-0.74). The text of all training scenes, not 1,500: 0.740 vs 0.701 (seed 0), 0.705 vs 0.595 (seed 1)
        clip_share=0.48,
    ),  # fmt: skip
    "small": Preset(
        seconds=1200, vocab_size=2048,
        patch_size=8, vision_hidden=192, vision_layers=6, vision_heads=6,
        text_hidden=128, text_layers=3, text_heads=4, projection_dim=192, clip_batch=128, clip_lr=1e-3, region_weight=1.0,
        lm_hidden=256, lm_layers=4, lm_heads=4, lm_context=256, lm_batch=16, lm_lr=1.5e-3, lm_scenes=20000,
    ),  # fmt: skip
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise VituneError(f"unknown backbone preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def lr_at(progress: float, peak: float, warmup: float = 0.05, floor: float = 0.05) -> float:
    """Learning rate at `progress` in [0, 1] of a run: linear warm-up, then cosine to floor*peak."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def _save_dir(target: Path, save: Callable[[Path], None]) -> None:
    """Write a directory next to `target`, then swap it in, so a killed run never leaves half a model."""
    with atomic_dir(target) as tmp:
        save(tmp)


def load_split(world: Path, split: str) -> list[Scene]:
    path = world / f"{split}.jsonl"
    if not path.exists():
        raise VituneError(f"{path}: not found; render the world first (`vitune world render --out {world}`)")
    return list(read_scenes(path))


def load_images(world: Path, scenes: Sequence[Scene], size: int):  # -> torch.Tensor uint8 [N, 3, S, S]
    import numpy as np
    import torch
    from PIL import Image

    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for k, scene in enumerate(scenes):
        path = world / scene.image
        try:
            image = Image.open(path).convert("RGB")
        except (FileNotFoundError, OSError) as err:
            raise VituneError(f"{path}: cannot read image of scene {scene.id} ({err})") from err
        if image.size != (size, size):
            raise VituneError(f"{path}: image is {image.size[0]}x{image.size[1]}, the world says {size}x{size}")
        out[k] = np.asarray(image)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalize(images):  # uint8 [N, 3, S, S] -> float [N, 3, S, S], as CLIPImageProcessor does
    import torch

    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------------------------
# CLIP


def clip_config(preset: Preset, image_size: int, tokenizer) -> Any:
    from transformers import CLIPConfig

    if image_size % preset.patch_size:
        raise VituneError(f"world image size {image_size} is not a multiple of the patch size {preset.patch_size}")
    text = dict(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden, intermediate_size=preset.text_mlp_ratio * preset.text_hidden,
        hidden_act="gelu",
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=preset.projection_dim,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vision = dict(
        hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden, hidden_act="gelu",
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=image_size, patch_size=preset.patch_size, projection_dim=preset.projection_dim,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=preset.projection_dim)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class CaptionSampler:
    """Fresh true captions and their hard negatives for training scenes (NegCLIP)."""

    def __init__(self, scenes: Sequence[Scene], seed: int) -> None:
        self.scenes = scenes
        self.rng = random.Random(seed)

    def batch(self, indices: Sequence[int]) -> tuple[list[str], list[str]]:
        from vitune.world.captions import FAMILIES, FULL_DESCRIPTION, caption, hard_negative

        kinds, weights = list(NEGATIVE_KIND_WEIGHTS), list(NEGATIVE_KIND_WEIGHTS.values())
        positives, negatives = [], []
        for k in indices:
            insts = self.scenes[k].instances
            family, seed = self.rng.randrange(len(FAMILIES)), self.rng.getrandbits(32)
            positives.append(caption(insts, family, seed))
            kind = self.rng.choices(kinds, weights)[0]
            fake = hard_negative(insts, family, seed, kind, self.rng)
            if fake is None:  # this family cannot show that change: try the full description
                fake = hard_negative(insts, FULL_DESCRIPTION, seed, kind, self.rng)
            if fake is not None:
                negatives.append(fake)
        return positives, negatives


def _encode_text(model, tokenizer, texts: Sequence[str], chunk: int = 64):
    """Normalised text embeddings. Texts are encoded in chunks of similar length, so a short
    caption is not padded to the longest one of the batch (half the text tower's cost)."""
    import torch
    import torch.nn.functional as F

    ids = tokenizer(list(texts), truncation=True, max_length=TEXT_MAX_LENGTH)["input_ids"]
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    pooled = []
    for start in range(0, len(order), chunk):
        rows = [ids[k] for k in order[start : start + chunk]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        pooled.append(model.text_model(input_ids=input_ids, attention_mask=mask).pooler_output)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return F.normalize(model.text_projection(torch.cat(pooled)[inverse]), dim=-1)


def _vision(model, pixels):
    """(normalised image embeddings, penultimate-layer patch tokens) for a batch of images."""
    import torch.nn.functional as F

    out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    return F.normalize(model.visual_projection(out.pooler_output), dim=-1), out.hidden_states[-2][:, 1:]


def train_clip(
    model, tokenizer, images, scenes: Sequence[Scene], preset: Preset, budget: Budget, seed: int
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from vitune.world.probes import POSITIONS, pooled_object_features

    torch.manual_seed(seed)
    attributes = (SHAPES, COLORS, SIZES, POSITIONS)
    spans, start = [], 0
    for values in attributes:
        spans.append((start, start + len(values)))
        start += len(values)
    object_targets = [
        torch.tensor([[SHAPES.index(i.category), COLORS.index(i.color), SIZES.index(i.size), POSITIONS.index(position_phrase(i))] for i in s.instances])
        for s in scenes
    ]
    region_head = torch.nn.Linear(preset.vision_hidden, start)
    params = list(model.parameters()) + list(region_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=preset.clip_lr, betas=(0.9, 0.98)
    )
    sampler = CaptionSampler(scenes, seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.monotonic()
    steps, seen, losses, region_losses = 0, 0, [], []
    bar = budget.bar("clip")
    # Phase 1 (the region_phase share of the budget): the vision tower alone learns to name each
    # object's attributes from its patches, at a fraction of a full step's cost. Phase 2:
    # contrastive image-caption training of both towers, the region loss kept on. Each phase has
    # its own warm-up and decay.
    region_only = preset.region_phase if preset.region_weight else 0.0
    contrastive_steps = 0
    while (spent := budget.spent(time.monotonic() - start, steps)) < 1:
        phase_one = spent < region_only
        progress = spent / region_only if phase_one else (spent - region_only) / (1 - region_only)
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, preset.clip_lr)
        idx = torch.randint(len(scenes), (preset.clip_batch,), generator=gen).tolist()
        pixels = normalize(images[idx])
        img, patches = _vision(model, pixels)
        loss = torch.zeros(())
        if not phase_one:
            positives, negatives = sampler.batch(idx)
            txt = _encode_text(model, tokenizer, positives + negatives)
            pos, neg = txt[: len(positives)], txt[len(positives) :]
            scale = model.logit_scale.exp().clamp(max=100)
            target = torch.arange(len(idx))
            loss_i2t = F.cross_entropy(scale * img @ torch.cat([pos, neg]).T, target)
            loss_t2i = F.cross_entropy(scale * pos @ img.T, target)
            loss = (loss_i2t + loss_t2i) / 2
            losses.append(loss.item())
            contrastive_steps += 1
        if preset.region_weight:
            # Region supervision: the penultimate patch tokens pooled over each object's box
            # must name its shape, colour, size and place (one linear head per attribute).
            logits = region_head(pooled_object_features(patches, [scenes[k] for k in idx]))
            targets = torch.cat([object_targets[k] for k in idx])
            region_loss = sum(
                w * F.cross_entropy(logits[:, lo:hi], targets[:, a]) for a, ((lo, hi), w) in enumerate(zip(spans, ATTRIBUTE_WEIGHTS))
            )
            loss = loss + preset.region_weight * region_loss
            region_losses.append(float(region_loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps += 1
        seen += len(idx)
        budget.show(bar, time.monotonic() - start, steps)
        bar.set_postfix(step=steps, loss=f"{_mean(losses[-20:]):.3f}", region=f"{_mean(region_losses[-20:]):.3f}", refresh=False)
        bar.refresh()
    bar.close()
    model.eval()
    return {
        "contrastive_steps": contrastive_steps,
        "final_region_loss": round(_mean(region_losses[-20:]), 4),
        "steps": steps,
        "images_seen": seen,
        "epochs": round(seen / len(scenes), 2),
        "seconds": round(time.monotonic() - start, 1),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
    }


def evaluate_clip(model, tokenizer, world: Path, val: Sequence[Scene], test: Sequence[Scene], preset: Preset, image_size: int) -> dict[str, Any]:
    """Retrieval among held-out scenes, hard-negative choice, and linear probes (vs random init)."""
    import torch
    from transformers import CLIPModel

    from vitune.world.captions import FAMILIES, FULL_DESCRIPTION, NEGATIVE_KINDS, caption, hard_negative
    from vitune.world.probes import probe_accuracies, retrieval_top1

    # The first test scenes serve retrieval and probe scoring alike (enough objects for a
    # tight accuracy, few enough to keep the gauges a small share of the budget).
    test = list(test[:PROBE_TEST_SCENES])
    ret_scenes = test[:RETRIEVAL_SCENES]
    probe_train = list(val[: preset.probe_scenes])
    with torch.no_grad():
        test_images = normalize(load_images(world, test, image_size))
        train_images = normalize(load_images(world, probe_train, image_size))
        img, test_patches = _batched_vision(model, test_images)
        _, train_patches = _batched_vision(model, train_images)
        n = len(ret_scenes)
        by_family = {}
        for family in range(len(FAMILIES)):
            txt = _encode_text(model, tokenizer, [s.captions[family] for s in ret_scenes])
            by_family[FAMILIES[family].__name__] = round(retrieval_top1(img[:n], txt), 4)
        rng = random.Random(0)
        negative_acc = {}
        for kind in NEGATIVE_KINDS:
            rows, trues, fakes = [], [], []
            for k, scene in enumerate(ret_scenes):
                fake = hard_negative(scene.instances, FULL_DESCRIPTION, 0, kind, rng)
                if fake is not None:
                    rows.append(k)
                    trues.append(caption(scene.instances, FULL_DESCRIPTION, 0))
                    fakes.append(fake)
            emb_true, emb_fake = _encode_text(model, tokenizer, trues), _encode_text(model, tokenizer, fakes)
            wins = ((emb_true * img[rows]).sum(-1) > (emb_fake * img[rows]).sum(-1)).float().mean().item()
            negative_acc[kind] = round(wins, 4)
        probes = probe_accuracies(train_patches, probe_train, test_patches, test)
        torch.manual_seed(0)
        random_model = CLIPModel(model.config).eval()
        _, rtrain = _batched_vision(random_model, train_images)
        _, rtest = _batched_vision(random_model, test_images)
        random_probes = probe_accuracies(rtrain, probe_train, rtest, test)
    return {
        "retrieval_scenes": n,
        "retrieval_top1": by_family[FAMILIES[FULL_DESCRIPTION].__name__],
        "retrieval_chance": round(1 / n, 4),
        "retrieval_top1_by_caption_family": by_family,
        "hard_negative_accuracy": negative_acc,
        "probe_objects_fit": sum(len(s.instances) for s in probe_train),
        "probe_objects_scored": sum(len(s.instances) for s in test),
        "probes": probes,
        "probes_random_init": random_probes,
    }


def _batched_vision(model, pixels, batch: int = 256):
    import torch

    embs, patches = [], []
    for k in range(0, len(pixels), batch):
        e, p = _vision(model, pixels[k : k + batch])
        embs.append(e)
        patches.append(p)
    return torch.cat(embs), torch.cat(patches)


def save_clip(model, tokenizer, image_size: int, target: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )  # fmt: skip
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    _save_dir(target, save)


# --------------------------------------------------------------------------------------------
# LM


def lm_config(preset: Preset, tokenizer) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.lm_hidden, intermediate_size=int(preset.lm_hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=preset.lm_layers, num_attention_heads=preset.lm_heads, num_key_value_heads=preset.lm_heads,
        max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def pack(tokenizer, documents: Sequence[str], context: int):  # -> LongTensor [blocks, context]
    """Documents as `<s> text </s>`, concatenated and cut into blocks (the usual LM packing)."""
    import torch

    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (tokenizer.bos_token_id, *doc, tokenizer.eos_token_id)]
    blocks = len(stream) // context
    if blocks == 0:
        raise VituneError(f"world text is {len(stream)} tokens, less than one LM block of {context}")
    return torch.tensor(stream[: blocks * context]).view(blocks, context)


def _timed_steps(model, opt, budget: Budget, desc: str, step_loss: Callable[[float], Any]) -> dict[str, Any]:
    """Optimizer steps on `step_loss(progress)` (progress in [0, 1) of the budget) until the
    budget is spent, gradients clipped to norm 1, with a progress bar."""
    import torch

    params = [p for group in opt.param_groups for p in group["params"]]
    model.train()
    start = time.monotonic()
    steps, losses = 0, []
    bar = budget.bar(desc)
    while (spent := budget.spent(time.monotonic() - start, steps)) < 1:
        loss = step_loss(spent)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps += 1
        losses.append(loss.item())
        budget.show(bar, time.monotonic() - start, steps)
        bar.set_postfix(step=steps, loss=f"{_mean(losses[-20:]):.3f}", refresh=False)
        bar.refresh()
    bar.close()
    model.eval()
    return {"steps": steps, "seconds": round(time.monotonic() - start, 1), "final_loss": round(_mean(losses[-20:]), 4) if losses else None}


def train_lm(model, blocks, preset: Preset, budget: Budget, seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = lm_optimizer(model, preset)

    def step_loss(progress: float):
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, preset.lm_lr)
        batch = blocks[torch.randint(len(blocks), (preset.lm_batch,), generator=gen)]
        return model(input_ids=batch, labels=batch).loss

    run = _timed_steps(model, opt, budget, "lm", step_loss)
    return {**run, "tokens_seen": run["steps"] * preset.lm_batch * preset.lm_context}


def lm_optimizer(model, preset: Preset):
    """The LM pretraining's optimizer (`Preset.lm_optimizer`, built by `vitune.train.optim`, as
    stage 2's): weight decay 0.1 on matrices, none on norms; with "muon", Muon takes the hidden
    matrices and AdamW the rest."""
    from vitune.train.optim import OPTIMIZERS, build_optimizer

    if preset.lm_optimizer not in OPTIMIZERS:
        raise VituneError(f"lm_optimizer: unknown optimizer {preset.lm_optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1, "lr": preset.lm_lr, "base_lr": preset.lm_lr, "name": "lm/decay"},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": preset.lm_lr, "base_lr": preset.lm_lr, "name": "lm/no_decay"},
    ]  # fmt: skip
    return build_optimizer(preset.lm_optimizer, model, groups, betas=(0.9, 0.95), eps=1e-8, fused=False)


def chat_examples(tokenizer, chats: Sequence[tuple[str, Sequence[tuple[int, int]]]], max_length: int = 512) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per chat: `<s>` + the text's tokens; labels only on tokens that overlap
    an answer span (the rest -100), as instruction tuning does."""
    enc = tokenizer([text for text, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), tokens, offsets in zip(chats, enc["input_ids"], enc["offset_mapping"]):
        labels = [t if any(end > a and start < b for a, b in spans) else -100 for t, (start, end) in zip(tokens, offsets)]
        out.append(([tokenizer.bos_token_id, *tokens][:max_length], [-100, *labels][:max_length]))
    return out


def chat_tune(model, examples: Sequence[tuple[list[int], list[int]]], preset: Preset, budget: Budget, seed: int, pad_id: int) -> dict[str, Any]:
    """Tune the pretrained LM on chats for the budget, random batches padded to the longest."""
    import torch

    gen = random.Random(seed)
    examples = list(examples)
    size = min(preset.chat_batch, len(examples))
    opt = torch.optim.AdamW(model.parameters(), lr=preset.chat_lr, betas=(0.9, 0.95), weight_decay=0.0)  # constant rate

    def step_loss(progress: float):
        batch = gen.sample(examples, size)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    run = _timed_steps(model, opt, budget, "lm chat", step_loss)
    return {**run, "samples_seen": run["steps"] * size}


def perplexity(model, blocks, batch: int = 32) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(blocks), batch):
            chunk = blocks[k : k + batch]
            loss = model(input_ids=chunk, labels=chunk).loss
            n = chunk.numel() - len(chunk)  # predicted positions
            total += loss.item() * n
            count += n
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------


def make_backbones(world: Path, out: Path, preset: str = "tiny", seconds: float | None = None, seed: int = 0,
                   steps: dict[str, int] | None = None, parallel: bool | None = None) -> dict:
    """Train the tokenizer, B/clip and B/lm on the world at `world`; returns (and writes) the report.
    `steps` ({"clip", "lm", "chat"} -> N) fixes those phases' optimizer steps instead of their time.
    `parallel`: train the LM in a second process beside the CLIP (None: when the job has 2+ threads)."""
    with flush_subnormals(), job_threads() as threads:  # subnormal arithmetic is slow on x86 (see vitune.cpu)
        return _make_backbones(Path(world), Path(out), preset, seconds, seed, threads, dict(steps or {}), parallel)


def _make_backbones(world: Path, out: Path, preset: str, seconds: float | None, seed: int, threads: int,
                    steps: dict[str, int], parallel: bool | None) -> dict:
    import torch

    from vitune.world.corpus import corpus, template_texts
    from vitune.world.render import read_world_meta
    from vitune.world.tokenizer import as_transformers, train_tokenizer

    t0 = time.monotonic()
    p = get_preset(preset)
    budget = float(seconds if seconds is not None else p.seconds)
    if budget <= 0:
        raise VituneError(f"--seconds must be positive (got {seconds})")
    unknown = sorted(set(steps) - set(STEP_PHASES))
    if unknown or any(not isinstance(n, int) or n < 1 for n in steps.values()):
        raise VituneError(f"steps: want {{PHASE: N >= 1}} for PHASE in {', '.join(STEP_PHASES)} (got {steps})")
    meta = read_world_meta(world)
    image_size = int(meta["size"])
    train, val, test = (load_split(world, s) for s in ("train", "val", "test"))
    if len(val) < 8 or len(test) < 8:
        raise VituneError(f"{world}: val and test need at least 8 scenes each for the gauges (have {len(val)}, {len(test)})")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # 1. tokenizer
    lm_train_docs = list(corpus(train[: p.lm_scenes], seed))
    lm_val_docs = list(corpus(val, seed + 1))
    tok = train_tokenizer(lm_train_docs + template_texts(), p.vocab_size)
    lm_tokenizer = as_transformers(tok, add_eos=False, model_max_length=1024)
    clip_tokenizer = as_transformers(tok, add_eos=True, model_max_length=TEXT_MAX_LENGTH)
    _save_dir(out / "tokenizer", lm_tokenizer.save_pretrained)
    caption_lengths = [len(x) for x in lm_tokenizer([c for s in val[:200] for c in s.captions])["input_ids"]]
    report: dict[str, Any] = {
        "preset": preset,
        "preset_config": asdict(p),
        "seconds_budget": budget,
        "steps_budget": steps or None,
        "torch_threads": threads,
        "world": {"path": str(world), "image_size": image_size, "train_scenes": len(train), "val_scenes": len(val), "test_scenes": len(test)},
        "tokenizer": {
            "vocab_size": len(lm_tokenizer),
            "mean_tokens_per_caption": round(sum(caption_lengths) / len(caption_lengths), 1),
            "seconds": round(time.monotonic() - t0, 1),
        },
    }
    _log(f"tokenizer: {len(lm_tokenizer)} tokens, {report['tokenizer']['mean_tokens_per_caption']} tokens per caption")

    # 2. CLIP and 3. LM: side by side when the job has two or more threads. Neither needs the
    # other, and on small models one thread each does more than both threads on one: on the 2-core
    # AMD machine a CLIP step took 0.198 s with both threads and 0.254 s with one while the LM
    # trained beside it (LM: 0.151 and 0.231 s), so in the same wall time the CLIP gets 1.56x and
    # the LM 1.31x the steps. Each phase then runs until the shared deadline, less its gauges.
    deadline = t0 + budget  # time.monotonic() is system-wide on Linux, so the LM's process shares it
    lm_job = LMJob(out, p, seed, steps.get("lm"), steps.get("chat"), deadline, budget, lm_train_docs, lm_val_docs, world)
    side_by_side = parallel if parallel is not None else threads >= 2
    if side_by_side:
        lm_threads = max(1, threads // 2)
        torch.set_num_threads(max(1, threads - lm_threads))
        _log(f"lm: training in a second process beside the CLIP ({lm_threads} and {threads - lm_threads} threads)")
        with _lm_process(replace(lm_job, bars=False), lm_threads) as lm_result:
            report["clip"] = _clip_phase(world, out, p, clip_tokenizer, train, val, test, image_size, seed,
                                         Budget(max(1.0, deadline - time.monotonic() - p.eval_reserve * budget), steps.get("clip")))
            report["lm"] = lm_result()
        torch.set_num_threads(threads)
    else:
        remaining = deadline - time.monotonic() - p.eval_reserve * budget
        report["clip"] = _clip_phase(world, out, p, clip_tokenizer, train, val, test, image_size, seed,
                                     Budget(max(1.0, p.clip_share * remaining), steps.get("clip")))
        report["lm"] = lm_job.run(lm_tokenizer)
    report["side_by_side"] = side_by_side
    report["seconds_used"] = round(time.monotonic() - t0, 1)
    report["targets"] = {
        "retrieval_top1>=0.5": report["clip"]["retrieval_top1"] >= 0.5,
        **{f"probe_{k}>=0.9": v["accuracy"] >= 0.9 for k, v in report["clip"]["probes"].items()},
    }
    atomic_write_json(out / "report.json", report)
    return report


def _clip_phase(world: Path, out: Path, p: Preset, tokenizer, train: Sequence[Scene], val: Sequence[Scene], test: Sequence[Scene],
                image_size: int, seed: int, budget: Budget) -> dict[str, Any]:
    """Train, gauge and save B/clip; returns its report section."""
    t1 = time.monotonic()
    images = load_images(world, train, image_size)
    clip = _new_clip(clip_config(p, image_size, tokenizer))
    clip_train = train_clip(clip, tokenizer, images, train, p, budget, seed)
    del images
    gauges = evaluate_clip(clip, tokenizer, world, val, test, p, image_size)
    save_clip(clip, tokenizer, image_size, out / "clip")
    section = {
        "config": _clip_summary(clip),
        "parameters": sum(x.numel() for x in clip.parameters()),
        "vision_parameters": sum(x.numel() for x in clip.vision_model.parameters()),
        "image_tokens": (image_size // p.patch_size) ** 2,
        **clip_train,
        **gauges,
        "seconds_total": round(time.monotonic() - t1, 1),
    }
    _log(_clip_line(section))
    return section


@dataclass
class LMJob:
    """The LM's phases (pretraining, optional chat tuning, gauges, saving B/lm), runnable in this
    process or in a second one (it travels there as JSON, `to_json` / `from_json`)."""

    out: Path
    preset: Preset
    seed: int
    steps: int | None
    chat_steps: int | None
    deadline: float  # time.monotonic() by which the LM's phases and gauges end
    budget: float  # the whole backbone budget (its gauge reserve is a share of it)
    train_docs: list[str]
    val_docs: list[str]
    world: Path
    bars: bool = True

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out), "world": str(self.world)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LMJob:
        return cls(**{**data, "out": Path(data["out"]), "world": Path(data["world"]), "preset": Preset(**data["preset"])})

    def run(self, tokenizer) -> dict[str, Any]:
        from vitune.world.corpus import qa_chats
        from vitune.world.probes import text_qa

        p, seed = self.preset, self.seed
        t2 = time.monotonic()
        train_blocks = pack(tokenizer, self.train_docs, p.lm_context)
        val_blocks = pack(tokenizer, self.val_docs, p.lm_context)[:64]
        lm = _new_lm(lm_config(p, tokenizer), seed)

        def time_left() -> float:  # what the LM's phases may still spend, its gauges' reserve kept
            return max(1.0, self.deadline - time.monotonic() - LM_GAUGE_RESERVE * self.budget)

        lm_train = train_lm(lm, train_blocks, p, Budget(max(1.0, (1 - p.chat_share) * time_left()), self.steps, self.bars), seed)
        ppl = perplexity(lm, val_blocks)
        chat = None
        if p.chat_share > 0:
            examples = chat_examples(tokenizer, list(qa_chats(load_split(self.world, "train"), seed)))
            chat = chat_tune(lm, examples, p, Budget(time_left(), self.chat_steps, self.bars), seed, tokenizer.pad_token_id)
        reading = text_qa(lm, tokenizer, load_split(self.world, "test")[:TEXT_QA_SCENES], seed)

        def save_lm(tmp: Path) -> None:
            lm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        _save_dir(self.out / "lm", save_lm)
        section = {
            "config": {k: getattr(lm.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
            "parameters": sum(x.numel() for x in lm.parameters()),
            "context": p.lm_context,
            "train_tokens": train_blocks.numel(),
            **lm_train,
            "val_perplexity": round(ppl, 3),  # after pretraining, before chat tuning
            "chat": chat,
            "val_tokens": val_blocks.numel(),
            "uniform_perplexity": len(tokenizer),
            "text_qa": reading,
            "seconds_total": round(time.monotonic() - t2, 1),
        }
        tuned = f", then {chat['steps']} chat-tuning steps" if chat else ""
        _log(f"lm: held-out perplexity {ppl:.2f} (uniform {len(tokenizer)}), {lm_train['tokens_seen']} tokens seen{tuned}; "
             f"questions answered from the scene's text {reading['accuracy']:.2f} (chance {reading['chance']:.2f}): "
             + ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in reading["by_type"].items()))
        return section


def _lm_process_main(job_path: str, result_path: str) -> None:
    """The LM's process (`python -m vitune.world.backbones JOB RESULT`): runs the job (JSON) and
    writes {"ok": report section} or {"error": text} to RESULT."""
    import traceback

    import torch
    from transformers import AutoTokenizer

    data = json.loads(Path(job_path).read_text())
    job = LMJob.from_json(data["job"])
    torch.set_num_threads(data["threads"])
    try:
        with flush_subnormals():
            tokenizer = AutoTokenizer.from_pretrained(job.out / "tokenizer")
            result = {"ok": job.run(tokenizer)}
    except BaseException as err:  # noqa: BLE001 -- every failure goes back to the parent, which raises it
        result = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}
    atomic_write_json(Path(result_path), result)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), so a killed demo leaves no
    LM process training on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def _lm_process(job: LMJob, threads: int) -> Iterator[Callable[[], dict[str, Any]]]:
    """Run `job` in a second Python process while the body runs; yields a function that waits for
    its report. A fresh interpreter (`python -m`), not multiprocessing: spawn would re-import the
    caller's main module, and a script without a `__main__` guard would run itself again there.
    If this process is interrupted or dies, the LM's goes too (and B/lm, written through
    `_save_dir`, is either complete or absent)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".lm-", dir=job.out) as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps({"job": job.to_json(), "threads": threads}))
        process = subprocess.Popen(
            [sys.executable, "-m", "vitune.world.backbones", str(job_path), str(result_path)],
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

        def result() -> dict[str, Any]:
            code = process.wait()
            if not result_path.exists():
                raise VituneError(f"the LM's training process died (exit code {code})")
            out = json.loads(result_path.read_text())
            if "error" in out:
                raise VituneError(f"the LM's training process failed: {out['error']}")
            return out["ok"]

        try:
            yield result
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()


def _new_clip(config):
    from transformers import CLIPModel

    model = CLIPModel(config)
    # Training and the gauges run the plain attention: for sequences of ~10 image tokens and ~30
    # caption tokens, SDPA's CPU flash kernel costs more than the matmuls it replaces (a CLIP
    # step took 0.26 s with it, 0.19 s without, same numbers). Not saved: the checkpoint loads
    # with transformers' default, as any CLIP does.
    model.set_attn_implementation("eager")
    return model


def _new_lm(config, seed: int):
    """A freshly initialised LM whose weights depend on `seed` alone, not on what earlier steps
    (CLIP's training, its gauges) drew from torch's global generator: the LM's initialisation
    decides more of stage 2's outcome than any other single choice measured here."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _clip_summary(model) -> dict[str, Any]:
    v, t = model.config.vision_config, model.config.text_config
    return {
        "vision": {k: getattr(v, k) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")},
        "text": {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")},
        "projection_dim": model.config.projection_dim,
    }


def _clip_line(r: dict[str, Any]) -> str:
    probes = ", ".join(
        f"{k} {v['accuracy']:.2f} (random init {r['probes_random_init'][k]['accuracy']:.2f}, chance {v['chance']:.2f})"
        for k, v in r["probes"].items()
    )
    negs = ", ".join(f"{k} {v:.2f}" for k, v in r["hard_negative_accuracy"].items())
    return (
        f"clip: retrieval top-1 {r['retrieval_top1']:.3f} among {r['retrieval_scenes']} (chance {r['retrieval_chance']:.3f}); "
        f"hard negatives {negs}; probes {probes}; {r['steps']} steps, {r['epochs']} epochs"
    )


if __name__ == "__main__":  # the LM's process, started by `_lm_process`
    import sys

    _lm_process_main(sys.argv[1], sys.argv[2])
