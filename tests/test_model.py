"""The LLaVA model: feature splice, mixed batches, checkpoints, projectors, vision options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitune.errors import VituneError
from vitune.model.build import build_llava
from vitune.model.llava import LlavaModel
from vitune.model.projector import build_projector
from vitune.model.vision import load_vision_tower
from vitune.processor import LlavaProcessor


@pytest.fixture(scope="module")
def built(tiny_model_dir: Path) -> tuple[LlavaModel, LlavaProcessor]:
    return LlavaModel.from_pretrained(tiny_model_dir), LlavaProcessor.from_pretrained(tiny_model_dir)


def image(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_image_placeholders_receive_projected_features(built) -> None:
    model, proc = built
    ids, pixels = proc.encode_prompt([{"role": "user", "content": "<image>\nwhat is it?"}], [image((255, 0, 0))])
    ids_t = torch.tensor([ids])
    embeds = model.embed(ids_t, pixels)
    mask = ids_t[0] == model.config.image_token_id
    assert int(mask.sum()) == model.config.num_image_tokens == 16
    feats = model.encode_images(pixels)[0]
    torch.testing.assert_close(embeds[0, mask], feats)
    plain = model.language_model.get_input_embeddings()(ids_t)
    torch.testing.assert_close(embeds[0, ~mask], plain[0, ~mask])


def test_batch_of_two_images_and_text_only_matches_rows(built) -> None:
    """Several images in one sample and a text-only sample in the same padded batch."""
    model, proc = built
    a_ids, a_px = proc.encode_prompt([{"role": "user", "content": "<image> and <image> compare"}], [image((255, 0, 0)), image((0, 0, 255), (30, 10))])
    b_ids, _ = proc.encode_prompt([{"role": "user", "content": "how many objects are there in the image?"}])
    width = max(len(a_ids), len(b_ids))
    pad = proc.tokenizer.pad_token_id
    ids = torch.tensor([a_ids + [pad] * (width - len(a_ids)), b_ids + [pad] * (width - len(b_ids))])
    mask = torch.tensor([[1] * len(a_ids) + [0] * (width - len(a_ids)), [1] * len(b_ids) + [0] * (width - len(b_ids))])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, pixel_values=a_px).logits
        alone_a = model(torch.tensor([a_ids]), pixel_values=a_px).logits
        alone_b = model(torch.tensor([b_ids])).logits
    torch.testing.assert_close(batch[0, : len(a_ids)], alone_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[1, : len(b_ids)], alone_b[0], atol=1e-4, rtol=1e-4)


def test_placeholder_feature_mismatch_says_both_counts(built) -> None:
    model, proc = built
    ids, pixels = proc.encode_prompt([{"role": "user", "content": "<image>\nhi"}], [image((0, 255, 0))])
    two = torch.cat([pixels, pixels])
    with pytest.raises(VituneError, match=r"16 placeholder tokens, 32 features"):
        model(torch.tensor([ids]), pixel_values=two)
    with pytest.raises(VituneError, match=r"16 placeholder tokens, 0 features"):
        model(torch.tensor([ids]))


def test_marker_and_image_counts_must_agree(built) -> None:
    _, proc = built
    with pytest.raises(VituneError, match="2 <image> markers but 1 images"):
        proc.encode([{"from": "human", "value": "<image><image> x"}, {"from": "gpt", "value": "y"}], num_images=1)


def test_save_load_roundtrip_and_sharding(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, proc = built
    ids, pixels = proc.encode_prompt([{"role": "user", "content": "<image>\nwhat?"}], [image((1, 2, 3))])
    model.save_pretrained(tmp_path / "sharded", proc, max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    # no random initialisation of weights the checkpoint overwrites (it was most of a large load)
    calls = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_"):
        original = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    again = LlavaModel.from_pretrained(tmp_path / "sharded")
    assert calls == []
    torch.nn.init.normal_(torch.empty(2))  # and the init functions work again afterwards
    assert calls == ["normal_"]
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([ids]), pixel_values=pixels).logits, model(torch.tensor([ids]), pixel_values=pixels).logits)
    assert LlavaProcessor.from_pretrained(tmp_path / "sharded").encode_prompt([{"role": "user", "content": "what?"}])[0] == proc.encode_prompt([{"role": "user", "content": "what?"}])[0]


def test_projector_only_checkpoint(built, tmp_path: Path) -> None:
    model, _ = built
    model.save_projector(tmp_path / "proj")
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["projector.safetensors", "projector_config.json"]
    fresh = LlavaModel(model.config)
    assert not torch.equal(fresh.projector[0].weight, model.projector[0].weight)
    fresh.load_projector(tmp_path / "proj")
    for a, b in zip(fresh.projector.parameters(), model.projector.parameters()):
        assert torch.equal(a, b)
    meta = json.loads((tmp_path / "proj" / "projector_config.json").read_text())
    meta["projector"] = "linear"
    (tmp_path / "proj" / "projector_config.json").write_text(json.dumps(meta))
    with pytest.raises(VituneError, match="projector is 'linear'"):
        fresh.load_projector(tmp_path / "proj")


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(VituneError, match="no config.json"):
        LlavaModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(VituneError, match="vitune import"):
        LlavaModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, layers", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_registry(name: str, layers: int) -> None:
    proj = build_projector(name, 8, 12)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers
    assert proj(torch.zeros(2, 5, 8)).shape == (2, 5, 12)


def test_projector_errors() -> None:
    with pytest.raises(VituneError, match="identity"):
        build_projector("identity", 8, 12)
    assert isinstance(build_projector("identity", 8, 8), torch.nn.Identity)
    with pytest.raises(VituneError, match="unknown projector 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, 8)


@pytest.mark.parametrize("vision, select, layers, tokens, width", [
    ("clip", "patch", -2, 16, 32),
    ("clip", "cls_patch", -2, 17, 32),
    ("clip", "patch", [-2, -3], 16, 64),
    ("siglip", "patch", -2, 16, 32),  # SigLIP has no CLS token: patch keeps all 16
])
def test_vision_options(tmp_path: Path, vision: str, select: str, layers, tokens: int, width: int) -> None:
    from vitune.testing import make_tiny_backbones

    vdir, ldir = make_tiny_backbones(tmp_path, vision=vision, llm="qwen2" if vision == "siglip" else "llama")
    model, proc = build_llava(str(vdir), str(ldir), projector="linear", vision_feature_layer=layers, vision_feature_select=select, template="chatml")
    assert model.config.num_image_tokens == tokens
    assert model.vision.hidden_size == width
    ids, pixels = proc.encode_prompt([{"role": "user", "content": "<image>\nwhat?"}], [image((9, 9, 9), (24, 12))])
    assert sum(1 for t in ids if t == model.config.image_token_id) == tokens
    with torch.no_grad():
        assert model(torch.tensor([ids]), pixel_values=pixels).logits.shape[1] == len(ids)
    # penultimate layer, not the last: the features are hidden_states[-2] of the tower
    with torch.no_grad():
        hs = model.vision.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    first = layers if isinstance(layers, int) else layers[0]
    expect = hs[first][:, 1:] if (vision == "clip" and select == "patch") else hs[first]
    torch.testing.assert_close(model.vision(pixels)[..., :32], expect)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_vision_stops_at_its_deepest_feature_layer(tmp_path: Path, vision: str) -> None:
    from vitune.model.vision import VisionEncoder
    from vitune.testing import make_tiny_backbones

    vdir, _ = make_tiny_backbones(tmp_path, vision=vision, llm="llama")
    tower = load_vision_tower(str(vdir))
    pixels = torch.randn(2, 3, tower.config.image_size, tower.config.image_size)
    with torch.no_grad():
        hs = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
    ran = []
    layers[-1].register_forward_hook(lambda *_: ran.append("last"))
    for select in ([0, 1, -2], [-1], [-3, -2]):
        ran.clear()
        with torch.no_grad():
            feats = VisionEncoder(tower, select, "cls_patch", has_cls=False)(pixels)
        torch.testing.assert_close(feats, torch.cat([hs[i] for i in select], dim=-1))
        assert ran == (["last"] if -1 in select else [])  # the last layer runs only when it is read
    with pytest.raises(VituneError, match=f"vision_feature_layer {len(hs)} is out of range"):
        VisionEncoder(tower, [len(hs)], "patch", has_cls=False)(pixels)


def test_pad_aspect_ratio_fills_with_mean(built) -> None:
    _, proc = built
    wide = image((0, 0, 0), (32, 8))
    px = proc.preprocess_images([wide])[0]
    # the top rows are padding with the encoder's mean colour, i.e. ~0 after normalisation
    assert px[:, 0, :].abs().max() < 0.02
    assert px[:, 8, :].abs().min() > 0.5  # the black band in the middle is far from the mean
