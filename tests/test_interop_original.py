"""The original LLaVA release layout: tiny checkpoints written here by hand (config.json with the
mm_* keys, `pytorch_model.bin` from torch.save, a CLIP tower dir, a stage-1 `mm_projector.bin`)
import into vitune models whose logits equal the original architecture's computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from vitune.errors import VituneError

LLM = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=4,
           max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.02)


class Original:
    """The original model's pieces, kept in memory to compute what the original code computes."""

    def __init__(self, tower_dir: Path, llm_dir: Path, seed: int = 0) -> None:
        from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
        self.config = {
            "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "_name_or_path": "./checkpoints/vicuna-tiny",
            **LLM, "vocab_size": len(self.tokenizer), "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
            "tie_word_embeddings": False, "use_cache": True, "max_length": 4096, "torch_dtype": "float32",
            "transformers_version": "4.31.0", "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
            "mm_vision_tower": str(tower_dir), "mm_hidden_size": 32, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        }
        self.lm = LlamaForCausalLM(LlamaConfig(**LLM, vocab_size=len(self.tokenizer), tie_word_embeddings=False)).eval()
        self.tower = CLIPVisionModel.from_pretrained(str(tower_dir)).eval()
        self.projector = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)).eval()

    def state(self, with_tower: bool = False) -> dict[str, torch.Tensor]:
        state = {k: v.clone() for k, v in self.lm.state_dict().items()}
        state.update({f"model.mm_projector.{k}": v.clone() for k, v in self.projector.state_dict().items()})
        # transformers < 4.31 saved the rotary buffer; current versions recompute it
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        if with_tower:  # the original CLIPVisionTower wraps a transformers 4.x CLIPVisionModel (`vision_model.*`)
            state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone() for k, v in self.tower.state_dict().items()})
        return state

    def write(self, directory: Path, with_tower: bool = False, safetensors: bool = False, **config: object) -> Path:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({**self.config, **config}))
        self.tokenizer.save_pretrained(str(directory))
        if safetensors:
            from safetensors.torch import save_file

            save_file(self.state(with_tower), str(directory / "model.safetensors"))
        else:
            torch.save(self.state(with_tower), directory / "pytorch_model.bin")
        return directory

    @torch.no_grad()
    def logits(self, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
        """LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal, for one sample: the text
        embeddings split at each -200, the projected patch features spliced in."""
        feats = self.projector(self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        embed = self.lm.get_input_embeddings()
        pieces, image = [], 0
        for token in ids:
            if token == -200:
                pieces.append(feats[image])
                image += 1
            else:
                pieces.append(embed(torch.tensor([token])))
        return self.lm(inputs_embeds=torch.cat(pieces)[None]).logits


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(13, 21, 3, generator=g) * 255).to(torch.uint8).numpy())


def _prompt(tokenizer) -> list[int]:
    """What the original `tokenizer_image_token` makes of 'USER: <image>\\nwhat? ASSISTANT:'."""
    ids = [tokenizer.bos_token_id] + tokenizer("USER: ", add_special_tokens=False)["input_ids"] + [-200]
    return ids + tokenizer("\nwhat color is the circle? ASSISTANT:", add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def original(tiny_backbones: tuple[Path, Path]) -> Original:
    return Original(*tiny_backbones)


def _check_matches(original: Original, out: Path) -> None:
    from vitune.interop.original import expand_image_sentinel
    from vitune.model.llava import LlavaModel
    from vitune.processor import LlavaProcessor

    model = LlavaModel.from_pretrained(out)
    processor = LlavaProcessor.from_pretrained(out)
    vocab = len(original.tokenizer)
    assert model.config.image_token_id == vocab  # `<image>` appended after the original vocabulary
    ids = _prompt(original.tokenizer)
    pixels = processor.preprocess_images([_image()])
    ours_ids = expand_image_sentinel(ids, model.config.image_token_id, model.config.num_image_tokens)
    with torch.no_grad():
        ours = model(torch.tensor([ours_ids]), pixel_values=pixels).logits
    theirs = original.logits(ids, pixels)
    image_positions = [i for i, t in enumerate(ours_ids) if t == model.config.image_token_id]
    # Position by position: the original's sequence is ours with each image's placeholders in place of -200.
    assert ours.shape[1] == theirs.shape[1] and len(image_positions) == model.config.num_image_tokens
    assert (ours[..., :vocab] - theirs).abs().max().item() <= 1e-4
    # The added token's logit is the mean of the others, never the greedy choice.
    assert (ours[0, :, vocab] < ours[0, :, :vocab].max(-1).values).all()


def test_import_original_checkpoint_matches_the_original_computation(original: Original, tmp_path: Path) -> None:
    from vitune.interop.original import import_original
    from vitune.model.config import LlavaConfig

    src = original.write(tmp_path / "llava-v1.5-tiny")
    out = import_original(src, tmp_path / "ours")
    config = LlavaConfig.load(out)
    assert (config.projector, config.template, config.image_aspect_ratio, config.vision_feature_layer) == ("mlp2x_gelu", "vicuna_v1", "pad", -2)
    assert config.num_image_tokens == 16
    _check_matches(original, out)


def test_tower_weights_in_the_checkpoint_win_and_vision_overrides_the_path(original: Original, tiny_backbones: tuple[Path, Path], tmp_path: Path) -> None:
    from vitune.interop.original import import_original

    tuned = Original(*tiny_backbones)
    with torch.no_grad():
        for p in tuned.tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = tuned.write(tmp_path / "tuned", with_tower=True, safetensors=True, mm_vision_tower="openai/not-on-this-machine")
    with pytest.raises(VituneError, match="--vision"):
        import_original(src, tmp_path / "fails")
    out = import_original(src, tmp_path / "ours", vision=str(tiny_backbones[0]))
    _check_matches(tuned, out)


def test_import_stage1_projector_alone_and_into_a_base(original: Original, tiny_model_dir: Path, tiny_backbones: tuple[Path, Path], tmp_path: Path) -> None:
    from vitune.interop.original import import_original
    from vitune.model.build import build_llava
    from vitune.model.llava import LlavaModel

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    torch.save({f"model.mm_projector.{k}": v for k, v in original.projector.state_dict().items()}, stage1 / "mm_projector.bin")
    (stage1 / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))

    alone = import_original(stage1 / "mm_projector.bin", tmp_path / "projector")
    model, _ = build_llava(str(tiny_backbones[0]), str(tiny_backbones[1]))
    model.load_projector(alone)
    for k, v in original.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[k], v)

    merged = import_original(stage1, tmp_path / "merged", base=tiny_model_dir)
    base, got = LlavaModel.from_pretrained(tiny_model_dir), LlavaModel.from_pretrained(merged)
    for k, v in original.projector.state_dict().items():
        assert torch.equal(got.projector.state_dict()[k], v)
    for k, v in base.language_model.state_dict().items():
        assert torch.equal(got.language_model.state_dict()[k], v)

    linear = tmp_path / "linear.bin"
    torch.save({"model.mm_projector.weight": torch.zeros(32, 32), "model.mm_projector.bias": torch.zeros(32)}, linear)
    with pytest.raises(VituneError, match="'linear' projector but the base model"):
        import_original(linear, tmp_path / "bad", base=tiny_model_dir)


def test_original_import_is_strict(original: Original, tmp_path: Path) -> None:
    from vitune.interop.original import import_original

    src = original.write(tmp_path / "extra")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "model.image_newline": torch.zeros(32)}, src / "pytorch_model.bin")
    with pytest.raises(VituneError, match=r"language model.*unexpected \['model.image_newline'\]"):
        import_original(src, tmp_path / "o1")

    src = original.write(tmp_path / "stray")
    torch.save({**state, "model.vision_tower.image_newline": torch.zeros(32)}, src / "pytorch_model.bin")
    with pytest.raises(VituneError, match="no mapping.*vision_tower.image_newline"):
        import_original(src, tmp_path / "o5")

    src = original.write(tmp_path / "missing")
    state.pop("model.mm_projector.2.bias")
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(VituneError, match=r"mm_projector.*missing \['2.bias'\]"):
        import_original(src, tmp_path / "o2")

    src = original.write(tmp_path / "startend", mm_use_im_start_end=True)
    with pytest.raises(VituneError, match="mm_use_im_start_end"):
        import_original(src, tmp_path / "o3")

    src = original.write(tmp_path / "pickle")
    torch.save({"model.norm.weight": torch.ones(32), "code": Image.new("RGB", (1, 1))}, src / "pytorch_model.bin")
    with pytest.raises(VituneError, match="weights_only"):
        import_original(src, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_expand_image_sentinel() -> None:
    from vitune.interop.original import expand_image_sentinel

    assert expand_image_sentinel([1, -200, 5, -200], image_token_id=9, num_image_tokens=3) == [1, 9, 9, 9, 5, 9, 9, 9]


def test_cli_import_original(original: Original, tiny_backbones: tuple[Path, Path], tmp_path: Path) -> None:
    from vitune.cli import main
    from vitune.model.config import LlavaConfig

    src = original.write(tmp_path / "src", mm_vision_tower="/nowhere")
    args = ["import", "--format", "original", "--src", str(src), "--out", str(tmp_path / "out"), "--template", "llava_v0"]
    assert main(args + ["--vision", str(tiny_backbones[0])]) == 0
    assert LlavaConfig.load(tmp_path / "out").template == "llava_v0"
    assert main(["import", "--format", "original", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
