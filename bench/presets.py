"""Benchmark presets: the model shapes, the workloads, and building both models of a preset.

A preset is a model shape (vision tower, LLM, vocabulary) plus a workload (how many tokens, how
big a training batch, how many repeats). Weights are random: speed does not depend on their
values, and random weights make the benchmark reproducible without any download or training.
The vitune model is built with `build_llava` from saved backbones, exactly as `vitune build`
does; the reference reads vitune's own transformers export of it (`export_hf`), so both run the
same numbers. Built models are cached under `ROOT/models/<preset>-<digest>/`.

- `toy`: the synthetic world's model, the shape `make demo` trains (the world's backbone preset
  that the demo uses, read from `vitune.world.backbones` and `vitune.demo` so it follows them).
- `wide`: a realistic shape scaled to fit 2 CPU cores: a CLIP-B/16-like tower (224px, patch 16,
  hidden 768, 12 layers, 196 image tokens) and a few Llama layers as wide as a 1.5B LLM
  (hidden 1536, MLP 4096, 12 heads of 128) with Llama/Vicuna's 32000-token vocabulary.
- `smoke`: a seconds-long shape for the harness's own tests.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vitune.errors import VituneError


@dataclass(frozen=True)
class ModelShape:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    vocab_size: int
    tie_embeddings: bool
    template: str = "vicuna_v1"

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Workload:
    """How much work each case does; `repeats` timed runs per system after one warm-up."""

    new_tokens: int = 128  # decode_b1: forced length, both systems
    batch: int = 8  # decode_b8: prompts in the batch
    batch_new_tokens: int = 128  # decode_b8: forced length per prompt
    repeats: int = 3
    prefill_repeats: int = 5
    train_batch: int = 8  # samples per optimizer step (one micro-batch)
    train_epochs: int = 2  # epochs per system (each: first step warm-up, the rest timed)
    train_records: int = 96  # the synthetic training set (records // train_batch steps per epoch)
    max_length: int = 512  # tokens, image placeholders included
    text_only_share: float = 0.2  # share of samples without an image (LLaVA-665K mixes in ShareGPT text)
    answer_tokens_image: int = 40  # median answer tokens of a sample with an image (all turns)
    answer_tokens_text: int = 150  # median answer tokens of a text-only sample
    length_sigma: float = 0.8  # log-normal spread of answer lengths
    length_window: int = 16  # vitune's data.length_window (as its world-stage2 preset)


@dataclass(frozen=True)
class Preset:
    name: str
    shape: ModelShape
    work: Workload
    note: str


def toy_shape() -> ModelShape:
    """The demo's world backbones (`vitune.world.backbones.PRESETS[demo backbone_preset]`)."""
    from vitune.demo import DemoConfig
    from vitune.world.backbones import get_preset

    demo = DemoConfig()
    p = get_preset(demo.backbone_preset)
    return ModelShape(
        image_size=demo.image_size, patch_size=p.patch_size,
        vision_hidden=p.vision_hidden, vision_layers=p.vision_layers, vision_heads=p.vision_heads,
        vision_intermediate=4 * p.vision_hidden,
        lm_hidden=p.lm_hidden, lm_layers=p.lm_layers, lm_heads=p.lm_heads, lm_kv_heads=p.lm_heads,
        lm_intermediate=int(p.lm_hidden * 8 / 3) // 16 * 16,  # as `world.backbones.lm_config`
        vocab_size=p.vocab_size, tie_embeddings=True,
    )  # fmt: skip


WIDE_SHAPE = ModelShape(
    image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12, vision_intermediate=3072,
    lm_hidden=1536, lm_layers=2, lm_heads=12, lm_kv_heads=12, lm_intermediate=4096, vocab_size=32000,
    tie_embeddings=False,
)  # fmt: skip

SMOKE_SHAPE = ModelShape(
    image_size=16, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
    lm_hidden=32, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=64, vocab_size=600, tie_embeddings=False,
)  # fmt: skip


def get_preset(name: str) -> Preset:
    """A preset by exact name: `toy`, `wide` or `smoke`."""
    if name == "toy":
        return Preset("toy", toy_shape(), Workload(repeats=7, prefill_repeats=7, train_batch=16, train_epochs=3,
                                                   train_records=112, max_length=384),
                      "the synthetic world's model shape (demo backbones), random weights")
    if name == "wide":
        return Preset("wide", WIDE_SHAPE, Workload(repeats=3, prefill_repeats=9, batch_new_tokens=64, train_batch=4,
                                                   train_epochs=2, train_records=16, max_length=512),
                      "CLIP-B/16-like tower + 2 Llama layers of width 1536, vocab 32000, random weights")
    if name == "smoke":
        return Preset("smoke", SMOKE_SHAPE, Workload(new_tokens=8, batch=3, batch_new_tokens=6, repeats=2, prefill_repeats=2,
                                                     train_batch=4, train_epochs=1, train_records=12, max_length=96),
                      "a seconds-long shape for the harness's tests")
    raise VituneError(f"unknown benchmark preset {name!r}; known: toy, wide, smoke")


PRESET_NAMES = ("toy", "wide", "smoke")


def with_overrides(preset: Preset, **work: Any) -> Preset:
    """The preset with some workload fields changed (e.g. fewer repeats for a quick look)."""
    unknown = [k for k in work if k not in Workload.__dataclass_fields__]
    if unknown:
        raise VituneError(f"unknown workload field(s) {unknown}; known: {', '.join(Workload.__dataclass_fields__)}")
    return replace(preset, work=replace(preset.work, **work))


# -- text: a tokenizer with the shape's vocabulary ---------------------------------------------------

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch", "st", "tr", "pl", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")


def lexicon(n: int, seed: int = 0) -> list[str]:
    """`n` distinct pronounceable pseudo-words (a stand-in for a language's word list)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 4)))] = None
    return list(words)


ENGLISH = (
    "the a an of in on to and is are what where which how many describe image picture photo detail color colour shape "
    "object objects left right top bottom above below near next there this that it its with for from as by at be can "
    "you your please explain answer question red green blue yellow circle square triangle large small one two three"
).split()


def train_bench_tokenizer(vocab_size: int, seed: int = 0):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer (the world's conventions: `vitune.world.tokenizer`) with exactly
    `vocab_size` tokens, made without training (training 32K merges takes minutes here): the
    templates' words, some English and pseudo-words become tokens through prefix merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from vitune.world.corpus import template_texts
    from vitune.world.tokenizer import SPECIALS, as_transformers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    words = [w for text in template_texts() for w, _ in byte_level.pre_tokenize_str(text)]
    words += [v for w in (*ENGLISH, *lexicon(vocab_size, seed)) for v in ("\u0120" + w, w)]  # \u0120: a leading space
    merges: list[tuple[str, str]] = []
    for word in words:
        for end in range(2, len(word) + 1):
            if len(vocab) >= vocab_size:
                break
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SPECIALS[1]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return as_transformers(tok, add_eos=False, model_max_length=4096)


# -- building ------------------------------------------------------------------------------------------


def digest(preset: Preset) -> str:
    """What the built models depend on: the shape (not the workload)."""
    return hashlib.sha256(json.dumps(asdict(preset.shape), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Built:
    vitune_dir: Path
    hf_dir: Path


def build(preset: Preset, root: Path, seed: int = 0, log: Any = print) -> Built:
    """The preset's vitune model and its transformers export, built once and cached under `root`."""
    target = Path(root) / "models" / f"{preset.name}-{digest(preset)}"
    built = Built(target / "vitune", target / "hf")
    if (target / "done.json").is_file():
        return built
    log(f"[{preset.name}] building random-weight models in {target} (cached for later runs)")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    vdir, ldir = _make_backbones(preset.shape, target / "backbones", seed)
    from vitune.interop.hf import export_hf
    from vitune.model.build import build_llava

    model, processor = build_llava(str(vdir), str(ldir), template=preset.shape.template, seed=seed)
    model.save_pretrained(built.vitune_dir, processor)
    del model
    export_hf(built.vitune_dir, built.hf_dir)
    shutil.rmtree(target / "backbones", ignore_errors=True)
    from vitune.io import atomic_write_json

    atomic_write_json(target / "done.json", {"preset": preset.name, "shape": asdict(preset.shape)})
    return built


def _make_backbones(shape: ModelShape, root: Path, seed: int) -> tuple[Path, Path]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vitune.world.backbones import IMAGE_MEAN, IMAGE_STD

    torch.manual_seed(seed)
    vdir, ldir = root / "vision", root / "llm"
    tower = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=shape.image_size, patch_size=shape.patch_size, hidden_act="quick_gelu",
    ))  # fmt: skip
    tower.save_pretrained(str(vdir))
    CLIPImageProcessor(
        size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    ).save_pretrained(str(vdir))  # fmt: skip
    # Room for the tokens `vitune build` adds (<image>, template markers) inside the vocabulary.
    tokenizer = train_bench_tokenizer(shape.vocab_size - 8, seed)
    if len(tokenizer) > shape.vocab_size - 4:
        raise VituneError(f"tokenizer has {len(tokenizer)} tokens, more than the shape's vocabulary {shape.vocab_size}")
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.lm_hidden, intermediate_size=shape.lm_intermediate,
        num_hidden_layers=shape.lm_layers, num_attention_heads=shape.lm_heads, num_key_value_heads=shape.lm_kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    lm.save_pretrained(str(ldir))
    tokenizer.save_pretrained(str(ldir))
    return vdir, ldir
