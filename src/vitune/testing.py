"""Tiny backbones for tests and benchmarks: a tokenizer trained in-process, a tiny vision tower
and a tiny LLM, saved in the Hugging Face layout so they load exactly like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TINY_CORPUS = [
    "a red circle is on the left of a blue square",
    "what color is the circle? the circle is red.",
    "how many objects are there? there are three objects.",
    "describe the image in detail. the image shows a green triangle near the top right corner.",
    "USER: ASSISTANT: Human: Assistant: ### yes no one two three four five",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "[INST] <<SYS>> <</SYS>> [/INST] system user assistant",
    "first line\nsecond line\n",
] * 4


def train_tokenizer(out: Path, corpus: list[str] | None = None, vocab_size: int = 400):
    """A BPE tokenizer with sentencepiece-style spaces (Metaspace), as Llama's, wrapped as a
    transformers fast tokenizer with bos/eos/unk (and no pad, so `vitune build` must add one)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus or TINY_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return fast


def make_tiny_backbones(root: Path, vision: str = "clip", llm: str = "llama", image_size: int = 16, patch_size: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """(vision_dir, llm_dir) of random tiny backbones: hidden 32, 2 layers, 16-pixel images."""
    from transformers import (
        AutoModelForCausalLM,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        Qwen2Config,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    vdir, ldir = root / f"vision-{vision}", root / f"llm-{llm}"
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    if vision == "clip":
        tower = CLIPVisionModel(CLIPVisionConfig(projection_dim=32, **common))
        proc = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    elif vision == "siglip":
        tower = SiglipVisionModel(SiglipVisionConfig(**common))
        proc = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(vision)
    tower.save_pretrained(str(vdir))
    proc.save_pretrained(str(vdir))

    tokenizer = train_tokenizer(ldir)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg = LlamaConfig(**text, tie_word_embeddings=False) if llm == "llama" else Qwen2Config(**text, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(ldir))
    return vdir, ldir
