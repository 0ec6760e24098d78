"""transformers' LLaVA layout: export runs in transformers with the same logits, tokens, prompt ids
and pixels as vitune; import (of our exports and of models transformers itself saved) is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vitune.errors import VituneError

QUESTION = "what color is the circle?"


def _image(w: int = 20, h: int = 12, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _build(root: Path, vision: str = "clip", llm: str = "llama", **kwargs) -> Path:
    from vitune.model.build import build_llava
    from vitune.testing import make_tiny_backbones

    vdir, ldir = make_tiny_backbones(root / "backbones", vision=vision, llm=llm)
    model, processor = build_llava(str(vdir), str(ldir), **kwargs)
    out = root / "model"
    model.save_pretrained(out, processor)
    return out


def _export(model_dir: Path, out: Path) -> Path:
    from vitune.interop.hf import export_hf

    return export_hf(model_dir, out)


def _hf_model(directory: Path):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(directory), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _assert_same_logits(model_dir: Path, hf_dir: Path, images: list[Image.Image], text: str = QUESTION) -> None:
    from vitune.inference import GenerationRequest, Pipeline

    pipe = Pipeline.from_pretrained(model_dir, device="cpu", dtype="float32")
    ids, pixels = pipe.prepare(GenerationRequest([{"role": "user", "content": text}], images))
    x = torch.tensor([ids])
    hf = _hf_model(hf_dir)
    with torch.no_grad():
        ours = pipe.model(x, pixel_values=pixels).logits
        theirs = hf(input_ids=x, pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_model_dir, tmp_path_factory.mktemp("export") / "hf")


def test_export_gives_same_logits_in_transformers(tiny_model_dir: Path, exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == "default"
    _assert_same_logits(tiny_model_dir, exported, [_image()])
    _assert_same_logits(tiny_model_dir, exported, [_image(seed=1), _image(9, 17, seed=2)], text="<image>\ncompare <image> these")


def test_export_gives_same_greedy_tokens(tiny_model_dir: Path, exported: Path) -> None:
    from vitune.inference import GenerationRequest, Pipeline, SamplingParams

    pipe = Pipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    hf = _hf_model(exported)
    for seed in range(3):
        request = GenerationRequest([{"role": "user", "content": f"{QUESTION} {seed}"}], [_image(seed=seed)],
                                    SamplingParams(max_new_tokens=12))
        ours = pipe.generate([request])[0]
        _, pixels = pipe.prepare(request)
        x = torch.tensor([ours.prompt_ids])
        with torch.no_grad():
            # An explicit mask: generate() would otherwise mask every pad id, and pad is <unk> here,
            # which the tiny tokenizer emits for characters it never saw.
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pixels, max_new_tokens=12, do_sample=False)
        assert out[0, len(ours.prompt_ids):].tolist() == ours.output_ids


def test_hf_processor_expands_images_like_vitune(tiny_model_dir: Path, exported: Path) -> None:
    from transformers import AutoProcessor

    from vitune.interop.hf import render_segments
    from vitune.processor import LlavaProcessor

    ours = LlavaProcessor.from_pretrained(tiny_model_dir)
    theirs = AutoProcessor.from_pretrained(str(exported))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == render_segments("vicuna_v1", messages, ours.tokenizer, add_generation_prompt=True)
    square = _image(16, 16)
    enc = theirs(text=rendered, images=[square], return_tensors="pt", add_special_tokens=False)
    ids, pixels = ours.encode_prompt(messages, [square])
    image_id = ours.config.image_token_id
    assert enc["input_ids"][0].tolist().count(image_id) == ids.count(image_id) == ours.config.num_image_tokens
    assert torch.allclose(enc["pixel_values"], pixels, atol=1e-5)


def test_hf_processor_ids_equal_vitune_ids_for_plain_template(tmp_path: Path) -> None:
    """With `plain` the prompt is `<s><image>...`, which both tokenize the same way, so the ids
    must be identical: same placeholder id and count per image, same order."""
    from transformers import AutoProcessor

    from vitune.processor import LlavaProcessor

    model_dir = _build(tmp_path, template="plain")
    hf_dir = _export(model_dir, tmp_path / "hf")
    ours = LlavaProcessor.from_pretrained(model_dir)
    theirs = AutoProcessor.from_pretrained(str(hf_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "ignored"}]}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True)
    images = [_image(16, 16, seed=3), _image(16, 16, seed=4)]
    enc = theirs(text=rendered, images=images, return_tensors="pt", add_special_tokens=False)
    ids, _ = ours.encode_prompt(messages, images)
    assert enc["input_ids"][0].tolist() == ids
    assert ids.count(ours.config.image_token_id) == 2 * ours.config.num_image_tokens


_TEXT = st.lists(st.sampled_from(list("ab {}'\"\\\n<>é😀%#") + ["<image>", "{{", "{%", "{content}"]), max_size=8).map("".join)


@settings(max_examples=25, deadline=None)
@given(
    system=st.one_of(st.none(), _TEXT),
    turns=st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3),
    open_end=st.booleans(),
    parts=st.booleans(),
)
def test_chat_templates_render_exactly_like_vitune(system, turns, open_end, parts, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from vitune.interop.hf import chat_template_jinja, render_segments
    from vitune.templates import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    for user, answer in turns:
        content = [{"type": "image"}, {"type": "text", "text": user}] if parts else user
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    if open_end:
        messages = messages[:-1]
    for name in TEMPLATES.names():
        if name == "hf":
            continue
        jinja = chat_template_jinja(name, tokenizer)
        got = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=open_end)
        assert got == render_segments(name, messages, tokenizer, add_generation_prompt=open_end), name


def test_round_trip_export_import_same_logits(tiny_model_dir: Path, exported: Path, tmp_path: Path) -> None:
    from vitune.interop.hf import import_hf
    from vitune.model.config import LlavaConfig
    from vitune.model.llava import LlavaModel
    from vitune.processor import LlavaProcessor

    back = import_hf(exported, tmp_path / "back")
    before, after = LlavaConfig.load(tiny_model_dir), LlavaConfig.load(back)
    for field in ("template", "image_token_id", "num_image_tokens", "vision_feature_layer", "vision_feature_select",
                  "image_aspect_ratio", "projector", "vision_has_cls"):
        assert getattr(after, field) == getattr(before, field), field
    a, b = LlavaModel.from_pretrained(tiny_model_dir), LlavaModel.from_pretrained(back)
    proc = LlavaProcessor.from_pretrained(back)
    ids, pixels = proc.encode_prompt([{"role": "user", "content": QUESTION}], [_image()])
    assert ids == LlavaProcessor.from_pretrained(tiny_model_dir).encode_prompt([{"role": "user", "content": QUESTION}], [_image()])[0]
    with torch.no_grad():
        diff = (a(torch.tensor([ids]), pixel_values=pixels).logits - b(torch.tensor([ids]), pixel_values=pixels).logits).abs().max()
    assert diff.item() <= 1e-6


def test_import_of_a_model_transformers_saved(tiny_backbones: tuple[Path, Path], tmp_path: Path) -> None:
    """A LlavaForConditionalGeneration built and saved by transformers itself (module-name keys)."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vitune.interop.hf import import_hf
    from vitune.model.llava import LlavaModel

    vdir, ldir = tiny_backbones
    tokenizer = AutoTokenizer.from_pretrained(str(ldir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(1)
    config = LlavaConfig(vision_config=AutoConfig.from_pretrained(str(vdir)), text_config=AutoConfig.from_pretrained(str(ldir)),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16)
    config.text_config.vocab_size = len(tokenizer)
    hf = LlavaForConditionalGeneration(config).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(str(src))
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                   tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(str(src))

    out = import_hf(src, tmp_path / "ours", template="llava_v0")
    ours = LlavaModel.from_pretrained(out)
    assert ours.config.template == "llava_v0" and ours.config.image_aspect_ratio == "crop"
    ids = torch.tensor([[1, 5, 7] + [config.image_token_id] * 16 + [9, 11]])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a = ours(ids, pixel_values=pixels).logits
        b = hf(input_ids=ids, pixel_values=pixels).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_export_refuses_projectors_without_an_hf_equivalent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitune.cli import main

    model_dir = _build(tmp_path, projector="linear")
    with pytest.raises(VituneError, match="projector 'linear'.*mlp2x_gelu"):
        _export(model_dir, tmp_path / "hf")
    assert main(["export", "--model", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "mlp2x_gelu" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_siglip_tower_exports_with_full_strategy(tmp_path: Path) -> None:
    """SigLIP has no CLS token: nothing is dropped, which transformers calls "full"; the Qwen2 LLM
    has tied embeddings, so lm_head is not stored."""
    model_dir = _build(tmp_path, vision="siglip", llm="qwen2")
    hf_dir = _export(model_dir, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    proc = json.loads((hf_dir / "processor_config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full" and proc["num_additional_image_tokens"] == 0
    assert config["tie_word_embeddings"] is True
    _assert_same_logits(model_dir, hf_dir, [_image()])


def test_cls_patch_exports_with_full_strategy_and_cls_token(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    model_dir = _build(tmp_path, vision_feature_select="cls_patch", vision_feature_layer=[-2, -1])
    hf_dir = _export(model_dir, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["vision_feature_select_strategy"] == "full"
    _assert_same_logits(model_dir, hf_dir, [_image()])
    enc = AutoProcessor.from_pretrained(str(hf_dir))(text="<image>", images=[_image()], add_special_tokens=False)
    assert len(enc["input_ids"][0]) == 17  # 16 patches + CLS


def test_export_refuses_a_model_dir_that_also_holds_an_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "adapted"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(VituneError, match="LoRA adapter files.*merge-lora"):
        _export(model_dir, tmp_path / "hf")


def test_export_of_a_lora_adapter_merges_it_first(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from vitune.model.llava import LlavaModel
    from vitune.train.lora import LORA_META, merge_lora

    model = LlavaModel.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    peft_lm = get_peft_model(model.language_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "lora"
    peft_lm.save_pretrained(str(adapter))
    (adapter / LORA_META).write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    hf_dir = _export(adapter, tmp_path / "hf")
    merged = merge_lora(None, adapter, tmp_path / "merged")
    _assert_same_logits(merged, hf_dir, [_image()])
    # the adapter changed the model: the export is not just the base
    base = _hf_model(_export(tiny_model_dir, tmp_path / "base_hf"))
    x = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert (base(input_ids=x).logits - _hf_model(hf_dir)(input_ids=x).logits).abs().max() > 1e-3
    assert not [p for p in tmp_path.iterdir() if "merge-" in p.name]


def test_sharded_export_loads_and_imports(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Shards + index for transformers; and import reads transformers' older pytorch_model.bin too."""
    from safetensors.torch import load_file

    from vitune.interop.hf import export_hf, import_hf
    from vitune.model.llava import LlavaModel

    hf_dir = export_hf(tiny_model_dir, tmp_path / "hf", max_shard_size=40_000)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_logits(tiny_model_dir, hf_dir, [_image()])

    bin_dir = tmp_path / "bin"
    shutil.copytree(hf_dir, bin_dir)
    state: dict = {}
    for shard in set(index["weight_map"].values()):
        state.update(load_file(str(bin_dir / shard)))
        (bin_dir / shard).unlink()
    (bin_dir / "model.safetensors.index.json").unlink()
    torch.save(state, bin_dir / "pytorch_model.bin")
    back = LlavaModel.from_pretrained(import_hf(bin_dir, tmp_path / "back"))
    base = LlavaModel.from_pretrained(tiny_model_dir)
    for k, v in base.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_import_hf_checks_keys_and_shapes_strictly(exported: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from vitune.interop.hf import import_hf

    state = load_file(str(exported / "model.safetensors"))

    def variant(name: str, new_state: dict) -> Path:
        d = tmp_path / name
        shutil.copytree(exported, d)
        save_file(new_state, str(d / "model.safetensors"))
        return d

    renamed = dict(state)
    renamed["multi_modal_projector.linear_3.weight"] = renamed.pop("multi_modal_projector.linear_2.weight")
    with pytest.raises(VituneError, match=r"no mapping.*linear_3"):
        import_hf(variant("renamed", renamed), tmp_path / "o1")
    missing = {k: v for k, v in state.items() if k != "multi_modal_projector.linear_2.bias"}
    with pytest.raises(VituneError, match=r"missing \['2.bias'\]"):
        import_hf(variant("missing", missing), tmp_path / "o2")
    reshaped = dict(state)
    reshaped["language_model.model.norm.weight"] = torch.ones(7)
    with pytest.raises(VituneError, match=r"norm.weight has shape \(7,\)"):
        import_hf(variant("reshaped", reshaped), tmp_path / "o3")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_cli_export_and_import(tiny_model_dir: Path, tmp_path: Path) -> None:
    from vitune.cli import main
    from vitune.model.config import LlavaConfig

    assert main(["export", "--model", str(tiny_model_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "--format", "hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--template", "chatml"]) == 0
    assert LlavaConfig.load(tmp_path / "back").template == "chatml"
    assert main(["import", "--format", "hf", "--src", str(tiny_model_dir), "--out", str(tmp_path / "bad")]) == 2
