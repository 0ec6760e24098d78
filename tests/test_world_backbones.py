"""The world's backbones: trained by the quick preset in seconds, loaded with plain transformers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from vitune.errors import VituneError
from vitune.world.backbones import (
    PRESETS, Budget, _new_lm, chat_examples, chat_tune, load_images, lm_optimizer, lr_at, make_backbones, normalize, parse_steps, train_lm,
)
from vitune.world.corpus import CHAT_ASSISTANT, CHAT_USER, DETAIL_INSTRUCTIONS, chat, corpus, qa_chats, template_texts
from vitune.world.probes import _continuation_logprobs, box_weights, boxes_weights, text_qa
from vitune.world.questions import QUESTION_TYPES, chance_level
from vitune.world.render import render_world
from vitune.world.scene import COLORS, SHAPES, read_scenes


QUICK_STEPS = {"clip": 700, "lm": 110, "chat": 10}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("backbones")
    world, out = root / "world", root / "out"
    render_world(world, scenes=400, eval_scenes=100, seed=3, size=48)
    # Fixed step counts (about what 24 s buys on an idle machine): on a busy one a time budget left
    # CLIP at chance when this ran next to the demo test.
    report = make_backbones(world, out, preset="quick", seconds=24, steps=QUICK_STEPS, parallel=True)
    return world, out, report


def test_lm_beside_the_clip_is_the_lm_trained_after_it(made: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """The LM trained in a second process (the fixture) is the one the sequential path trains:
    same data, seed and steps; only the thread count differs, so the numbers agree to rounding."""
    world, _, report = made
    seq = make_backbones(world, tmp_path / "seq", preset="quick", seconds=24, steps={**QUICK_STEPS, "clip": 5}, parallel=False)
    assert report["side_by_side"] and not seq["side_by_side"]
    assert (seq["lm"]["steps"], seq["lm"]["chat"]["steps"]) == (110, 10)
    for key in ("final_loss", "val_perplexity"):
        assert seq["lm"][key] == pytest.approx(report["lm"][key], rel=1e-3), key
    assert seq["lm"]["chat"]["final_loss"] == pytest.approx(report["lm"]["chat"]["final_loss"], rel=1e-3)


def test_lm_process_failure_is_raised_here(tmp_path: Path) -> None:
    from vitune.world.backbones import LMJob, _lm_process

    job = LMJob(tmp_path, PRESETS["quick"], 0, 1, None, 0.0, 1.0, ["a b"], ["a b"], tmp_path)  # no tokenizer saved there
    with pytest.raises(VituneError, match="the LM.s training process failed: .*tokenizer"):
        with _lm_process(job, 1) as result:
            result()
    assert not (tmp_path / "lm").exists()


def test_lm_process_does_not_rerun_a_script_without_a_main_guard(tmp_path: Path) -> None:
    """A user's script that calls the backbones at top level must run once: the LM's process is a
    fresh interpreter, not a multiprocessing spawn (which re-imports the main module)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "from pathlib import Path\n"
        "from vitune.errors import VituneError\n"
        "from vitune.world.backbones import PRESETS, LMJob, _lm_process\n"
        "print('SCRIPT RAN', flush=True)\n"
        f"out = Path({str(tmp_path)!r})\n"
        "job = LMJob(out, PRESETS['quick'], 0, 1, None, 0.0, 1.0, ['a'], ['a'], out)\n"
        "try:\n"
        "    with _lm_process(job, 1) as result:\n"
        "        result()\n"
        "except VituneError as err:\n"
        "    print('RAISED', 'tokenizer' in str(err))\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.stdout.count("SCRIPT RAN") == 1 and "RAISED True" in run.stdout, run.stdout + run.stderr


def test_report(made: tuple[Path, Path, dict]) -> None:
    _, out, report = made
    assert json.loads((out / "report.json").read_text()) == report
    assert (report["clip"]["steps"], report["lm"]["steps"], report["lm"]["chat"]["steps"]) == (700, 110, 10)
    assert report["steps_budget"] == QUICK_STEPS
    assert report["clip"]["retrieval_scenes"] == 100
    assert set(report["clip"]["probes"]) == {"shape", "color", "position"}
    assert report["clip"]["image_tokens"] == (48 // PRESETS["quick"].patch_size) ** 2
    reading = report["lm"]["text_qa"]
    assert set(reading["by_type"]) == set(QUESTION_TYPES)
    assert all(v["chance"] == pytest.approx(chance_level(t), abs=1e-4) and v["n"] > 0 for t, v in reading["by_type"].items())
    assert 0.0 <= reading["accuracy"] <= 1.0


def test_step_budgets_parse_and_count() -> None:
    assert parse_steps("clip=600, lm=400") == {"clip": 600, "lm": 400}
    assert parse_steps(None) == {} == parse_steps("")
    for bad in ("clip", "vision=3", "lm=0", "lm=x"):
        with pytest.raises(VituneError, match="--steps: bad part"):
            parse_steps(bad)
    assert Budget(10.0, steps=4).spent(99.0, 2) == 0.5  # steps decide when given, not time
    assert Budget(10.0).spent(5.0, 1000) == 0.5


def test_quick_preset_beats_chance(made: tuple[Path, Path, dict]) -> None:
    clip, lm = made[2]["clip"], made[2]["lm"]
    assert clip["retrieval_top1"] > 2 * clip["retrieval_chance"], clip
    for target, probe in clip["probes"].items():
        assert probe["accuracy"] > probe["chance"] + 0.1, target
    # Training (not the architecture) puts the object's place into its patch features.
    assert clip["probes"]["position"]["accuracy"] > clip["probes_random_init"]["position"]["accuracy"] + 0.1
    assert lm["val_perplexity"] < lm["uniform_perplexity"] / 4


def test_clip_loads_with_transformers(made: tuple[Path, Path, dict]) -> None:
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    world, out, _ = made
    model = CLIPModel.from_pretrained(out / "clip").eval()
    vision = CLIPVisionModel.from_pretrained(out / "clip").eval()
    processor = CLIPProcessor.from_pretrained(out / "clip")
    scenes = list(read_scenes(world / "test.jsonl"))[:4]
    from PIL import Image

    images = [Image.open(world / s.image) for s in scenes]
    inputs = processor(text=[s.captions[1] for s in scenes], images=images, return_tensors="pt", padding=True)
    # The processor prepares pixels exactly as training did.
    torch.testing.assert_close(inputs["pixel_values"], normalize(load_images(world, scenes, 48)), atol=1e-5, rtol=0)
    assert (inputs["input_ids"] == processor.tokenizer.eos_token_id).any(-1).all()
    with torch.no_grad():
        out_full = model(**inputs)
        out_vision = vision(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        out_tower = model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
    assert out_full.logits_per_image.shape == (4, 4)
    torch.testing.assert_close(out_vision.hidden_states[-2], out_tower.hidden_states[-2])
    assert out_vision.hidden_states[-2].shape == (4, 1 + (48 // PRESETS["quick"].patch_size) ** 2, PRESETS["quick"].vision_hidden)


def test_lm_and_tokenizer_load_with_transformers(made: tuple[Path, Path, dict]) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, out, _ = made
    lm = LlamaForCausalLM.from_pretrained(out / "lm").eval()
    for path in (out / "lm", out / "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path)
        assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == ["<pad>", "<unk>", "<s>", "</s>"]
        text = "USER: How many red circles are there? Answer with a single word or phrase. ASSISTANT: 2"
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id  # Llama convention
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in tok("Ünïcode & emoji 🙂 survive byte-level BPE")["input_ids"]
    assert lm.config.vocab_size == len(tok) and lm.config.eos_token_id == tok.eos_token_id
    prompt = tok("There are two objects:", return_tensors="pt")
    with torch.no_grad():
        generated = lm.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_continuation_logprobs_score_each_text_alone(made: tuple[Path, Path, dict]) -> None:
    """Batched and padded, each text's score is its own tokens' log-probabilities after the shared prefix."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, out, _ = made
    lm, tok = LlamaForCausalLM.from_pretrained(out / "lm").eval(), AutoTokenizer.from_pretrained(out / "lm")
    prefix = "USER: A small red circle is at the top left. What color is the circle? ASSISTANT:"
    texts = [f"{prefix} red</s>", f"{prefix} top left</s>", f"{prefix} yellow and a longer tail</s>"]
    shared = len(tok(prefix, add_special_tokens=False)["input_ids"])
    expected = []
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = lm(input_ids=ids).logits[0, :-1].log_softmax(-1)
        expected.append(logprobs[torch.arange(shared - 1, ids.shape[1] - 1), ids[0, shared:]].sum())
    torch.testing.assert_close(_continuation_logprobs(lm, tok, texts), torch.stack(expected), atol=1e-4, rtol=0)


def test_text_qa_picks_the_likeliest_choice(made: tuple[Path, Path, dict]) -> None:
    """An LM that always says "yes" and one that always says "no" split the yes/no questions between
    them: the choice is the likeliest answer, scored per question."""
    from transformers import AutoTokenizer

    world, out, _ = made
    tok = AutoTokenizer.from_pretrained(out / "lm")
    scenes = list(read_scenes(world / "test.jsonl"))[:8]

    class Says(torch.nn.Module):  # logits favouring one word's tokens (and </s>) at every position
        def __init__(self, word: str) -> None:
            super().__init__()
            self.tokens = tok(" " + word + "</s>", add_special_tokens=False)["input_ids"]

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., self.tokens] = 20.0
            return type("Output", (), {"logits": logits})()

    yes, no = (text_qa(Says(word), tok, scenes)["by_type"] for word in ("yes", "no"))
    assert yes["existence"]["accuracy"] + no["existence"]["accuracy"] == pytest.approx(1.0, abs=1e-3)
    assert 0 < yes["existence"]["accuracy"] < 1
    assert yes["color"]["accuracy"] == no["color"]["accuracy"]  # neither word is a colour: the same tie


def test_tokenizer_has_words_for_the_world_and_its_questions(made: tuple[Path, Path, dict]) -> None:
    """At the tiny preset's vocabulary size the world's words are single tokens."""
    from vitune.world.tokenizer import as_transformers, train_tokenizer

    world = made[0]
    scenes = list(read_scenes(world / "train.jsonl"))
    tok = as_transformers(train_tokenizer(list(corpus(scenes, 0)) + template_texts(), PRESETS["tiny"].vocab_size), False, 512)
    words = [*SHAPES, *COLORS, "left", "right", "top", "bottom", "center", "above", "below", "yes", "no", "How", "many", "step"]
    for word in words:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_corpus_covers_question_kinds(made: tuple[Path, Path, dict]) -> None:
    scenes = list(read_scenes(made[0] / "val.jsonl"))[:50]
    text = "\n".join(corpus(scenes, 0))
    for needle in ("What color", "How many", "Where is", "relative to", "yes", "no", "step by step", "ASSISTANT:"):
        assert needle in text, needle
    # some request for a detailed description (one of the phrasings, drawn per scene)
    assert any(instruction in text for instruction in DETAIL_INSTRUCTIONS)


def test_qa_chats_mark_exactly_the_answers(made: tuple[Path, Path, dict]) -> None:
    from transformers import AutoTokenizer

    scenes = list(read_scenes(made[0] / "val.jsonl"))[:40]
    chats = list(qa_chats(scenes, 0))
    assert len(chats) == len(scenes)
    tok = AutoTokenizer.from_pretrained(made[1] / "lm")
    for (text, spans), (ids, labels) in zip(chats, chat_examples(tok, chats)):
        assert 1 <= len(spans) <= 3 and text.endswith("</s>")
        answers = [text[a:b] for a, b in spans]
        assert all(text[a - len(CHAT_ASSISTANT) - 1 : a] == f"{CHAT_ASSISTANT} " and x.endswith("</s>") for (a, _), x in zip(spans, answers))
        # the labelled tokens are the answers' tokens (with the space before a word) and nothing else
        assert tok.decode([t for t in labels if t != -100]).replace(" ", "") == "".join(answers).replace(" ", "")
        assert ids[0] == tok.bos_token_id and len(ids) == len(labels) and labels[0] == -100
    # the corpus's (and text_qa's) chat layout: the world template's (no system prompt), the scene's text, then the turns
    text, spans = chats[0]
    assert text.startswith(f"{CHAT_USER} ")
    context, first = text.removeprefix(f"{CHAT_USER} ").split("\n", 1)
    question = first.split(f" {CHAT_ASSISTANT} ", 1)[0]
    assert text.startswith(chat("", context, [(question, text[spans[0][0] : spans[0][1] - len("</s>")])]))


def test_the_world_text_chats_in_the_world_models_template() -> None:
    """The LM reads its chats in the layout the demo's LLaVA will be trained in (the scene's text
    where the image goes), so stage 2 meets a familiar format."""
    from types import SimpleNamespace

    from vitune.templates import Message, get_template
    from vitune.world.corpus import WORLD_TEMPLATE

    turns = [("What color is the circle?", "red"), ("Where is it?", "top left")]
    messages = [Message("user", "A red circle.\n" + turns[0][0]), Message("assistant", "red"),
                Message("user", turns[1][0]), Message("assistant", "top left")]
    tokenizer = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    rendered = "".join(text for text, _ in get_template(WORLD_TEMPLATE).segments(messages, tokenizer))
    assert rendered == "<s>" + chat(get_template(WORLD_TEMPLATE).system, "A red circle.", turns)
    assert rendered.startswith("<s>USER: A red circle.")


def test_chat_tuning_learns_the_answers(made: tuple[Path, Path, dict]) -> None:
    """Loss on the answers only: a few steps on a handful of chats bring that loss down."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = made[1], made[2]
    assert report["lm"]["chat"]["steps"] > 0 and PRESETS["quick"].chat_share > 0
    tok = AutoTokenizer.from_pretrained(out / "lm")
    lm = AutoModelForCausalLM.from_pretrained(out / "lm")
    examples = chat_examples(tok, list(qa_chats(list(read_scenes(made[0] / "val.jsonl"))[:8], 1)))

    def answer_loss() -> float:
        width = max(len(i) for i, _ in examples)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in examples])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in examples])
        with torch.no_grad():
            return lm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    before = answer_loss()
    stats = chat_tune(lm, examples, PRESETS["quick"], budget=Budget(3.0, steps=20), seed=0, pad_id=tok.pad_token_id)
    assert stats["steps"] == 20
    assert answer_loss() < 0.7 * before


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(VituneError, match="world.json"):
        make_backbones(tmp_path / "nowhere", tmp_path / "out", preset="quick", seconds=1)
    with pytest.raises(VituneError, match="unknown backbone preset 'huge'"):
        make_backbones(tmp_path, tmp_path / "out", preset="huge", seconds=1)


def test_lm_initialisation_depends_on_the_seed_alone() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(1)
    first = _new_lm(config, seed=7).state_dict()
    torch.rand(1000)  # what CLIP's steps would draw in between
    again, other = _new_lm(config, seed=7).state_dict(), _new_lm(config, seed=8).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])
    # and the global generator is left as it was
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    _new_lm(config, seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_lm_pretraining_optimizer(name: str) -> None:
    from dataclasses import replace

    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         tie_word_embeddings=True)  # fmt: skip
    model = _new_lm(config, seed=0)
    preset = replace(PRESETS["quick"], lm_optimizer=name, lm_lr=1e-2, lm_batch=4, lm_context=32)
    opt = lm_optimizer(model, preset)
    muon = {id(p) for g in opt.param_groups if g.get("muon") for p in g["params"]}
    layer = model.model.layers[0]
    hidden = {id(m.weight) for m in (*layer.self_attn.children(), *layer.mlp.children()) if hasattr(m, "weight")}
    assert muon == (hidden if name == "muon" else set())
    assert id(model.get_input_embeddings().weight) not in muon  # tied to the head: AdamW's, as in the references
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # a repeating sequence: both optimizers learn it within a few dozen steps
    blocks = torch.arange(8).repeat(4 * 16).view(16, 32) + 3
    before = model(input_ids=blocks[:4], labels=blocks[:4]).loss.item()
    run = train_lm(model, blocks, preset, Budget(60.0, steps=40, visible=False), seed=0)
    assert run["steps"] == 40 and run["final_loss"] < 0.5 * before
    with pytest.raises(VituneError, match="lm_optimizer: unknown optimizer 'sgd'"):
        lm_optimizer(model, replace(preset, lm_optimizer="sgd"))


def test_lr_schedule() -> None:
    assert lr_at(0.0, 1.0) < 0.05 and lr_at(0.05, 1.0) == pytest.approx(1.0)
    assert lr_at(1.0, 1.0) == pytest.approx(0.05)
    values = [lr_at(t / 100, 1.0) for t in range(5, 101)]
    assert values == sorted(values, reverse=True)


def test_box_weights() -> None:
    inside = box_weights((0.05, 0.05, 0.2, 0.2), 4)
    assert inside[0] == pytest.approx(1.0) and inside.sum() == pytest.approx(1.0)
    spread = box_weights((0.0, 0.0, 0.5, 0.5), 4)
    assert spread.tolist() == pytest.approx([0.25, 0.25, 0, 0, 0.25, 0.25, 0, 0] + [0] * 8)
    rng = random.Random(0)
    for _ in range(20):
        x1, y1 = rng.random() * 0.8, rng.random() * 0.8
        assert box_weights((x1, y1, x1 + 0.2, y1 + 0.2), 6).sum() == pytest.approx(1.0)
    boxes = [(0.05, 0.05, 0.2, 0.2), (0.0, 0.0, 0.5, 0.5), (0.3, 0.6, 0.9, 0.95)]
    many = boxes_weights(boxes, 4)
    assert many.shape == (3, 16)
    for row, box in zip(many, boxes):
        wx = [max(0.0, min((c + 1) / 4, box[2]) - max(c / 4, box[0])) for c in range(4)]
        wy = [max(0.0, min((r + 1) / 4, box[3]) - max(r / 4, box[1])) for r in range(4)]
        area = sum(wx) * sum(wy)
        assert row.tolist() == pytest.approx([y * x / area for y in wy for x in wx])


def test_cli_parses_backbones(tmp_path: Path) -> None:
    import argparse

    from vitune.world import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "backbones", "--world", "W", "--out", "B", "--preset", "tiny", "--seconds", "30"])
    assert (args.world, args.out, args.preset, args.seconds) == (Path("W"), Path("B"), "tiny", 30.0)
