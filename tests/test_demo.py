"""The demo pipeline end to end on its `quick` preset: every step runs and writes what it promises."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from vitune.demo import EVAL_TASKS, PRESETS, STEPS, Demo, DemoConfig
from vitune.errors import VituneError


def test_quick_demo_runs_every_step_and_reuses_them(tmp_path: Path, capsys) -> None:
    config = DemoConfig(**{**asdict(PRESETS["quick"]), "out": str(tmp_path / "demo")})
    metrics = Demo(config).run()
    out = Path(config.out)
    # metrics.json: the contract of issue 7
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"].keys() == set(STEPS)
    assert saved["total_seconds"] == metrics["total_seconds"] > 0
    for task in EVAL_TASKS:
        r = saved["eval"][task]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 < r["chance"] < 1.0
        assert r["by_type"] and all({"accuracy", "chance", "n"} <= set(v) for v in r["by_type"].values())
    assert set(saved["eval"]["toy-vqa"]["by_type"]) == {"color", "shape", "count", "position", "existence", "relation"}
    # each stage directory holds its resolved config, metrics, model; stage 1 its projector
    for stage in ("stage1", "stage2"):
        assert (out / stage / "config.yaml").is_file()
        lines = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert lines and all({"step", "loss"} <= set(x) for x in lines)
        assert (out / stage / "model" / "config.json").is_file()
    assert (out / "stage1" / "projector" / "projector.safetensors").is_file()
    for name in ("world/train.jsonl", "world/test.jsonl", "backbones/clip/config.json", "backbones/lm/config.json",
                 "data/stage1.json", "data/instruct.json", "model/config.json"):
        assert (out / name).is_file(), name
    kinds = {r.get("kind") for r in json.loads((out / "data" / "instruct.json").read_text())}
    assert {"conversation", "detail", "complex", "toy-vqa", "toy-scienceqa", "named-object"} <= kinds, kinds
    printed = capsys.readouterr().out
    assert "toy-vqa" in printed and "assistant:" in printed
    # the binding gauge asks toy-vqa's own colour and shape questions about the multi-object scenes
    from vitune.eval.toy import vqa_items
    from vitune.world.binding import binding_attention
    from vitune.world.scene import read_scenes

    crowded = {s.image for s in read_scenes(out / "world" / "test.jsonl") if len(s.instances) > 1}
    asked = [i.fields["type"] for i in vqa_items(out / "world", "test", seed=0) if i.fields["image"] in crowded]
    gauge = binding_attention(out / "stage2" / "model", out / "world", scenes=100)
    assert {t: g["n"] for t, g in gauge.items()} == {t: asked.count(t) for t in ("color", "shape") if t in asked}
    for g in gauge.values():
        assert all(0.0 <= g[k] <= 1.0 for k in ("first_layer_on_object_words", "last_layer_on_named_object", "last_layer_on_best_other"))
    # a rerun reuses every finished step
    again = Demo(config).run()
    assert "reused" in capsys.readouterr().out
    assert again["steps"] == metrics["steps"]
    # redoing a step redoes those after it, not those before (a training stage starts over); under a
    # time budget stage 2 ends when the steps before it, itself and the eval reserve would reach it
    before = sum(metrics["steps"][name]["seconds"] for name in STEPS[: STEPS.index("stage2")])
    timed = DemoConfig(**{**asdict(config), "time_budget": before + 35.0 + 3.0, "eval_reserve": 35.0, "min_stage2_seconds": 1.0,
                          "stage2_epochs": 200, "stage2_overrides": ["train.compile=false"]})
    Demo(timed).run(only=["stage2"])
    printed = capsys.readouterr().out
    assert "stage1: reused" in printed and "stage2: reused" not in printed and "eval: reused" not in printed
    summary = json.loads((out / "stage2" / "summary.json").read_text())
    assert summary["stopped_by"] == "max_seconds" and 0 < summary["steps"] < summary["planned_steps"]
    assert "(time budget reached)" in printed and (out / "stage2" / "model" / "config.json").is_file()
    assert json.loads((out / "steps" / "stage2.json").read_text())["optimizer_steps"] == summary["steps"]
    with pytest.raises(VituneError, match="would be left for stage 2"):
        Demo(DemoConfig(**{**asdict(timed), "time_budget": before + 10.0})).run(only=["stage2"])
    # a redone eval answers afresh: answers left by an earlier stage-2 model are not reused
    answers = out / "eval" / "toy-vqa.answers.jsonl"
    stale = [json.loads(x) for x in answers.read_text().splitlines()]
    stale[0]["text"] = "stale answer"
    answers.write_text("".join(json.dumps(r) + "\n" for r in stale))
    Demo(config).run(only=["eval"])
    capsys.readouterr()
    assert "stale answer" not in answers.read_text()


def test_benchmark_format_samples_mix_the_question_order(tmp_path: Path) -> None:
    """One multi-turn sample per image with its questions in a random order: in the task's own
    (type) order every first turn would be a colour question, and a model learns turn numbers."""
    from vitune.demo import benchmark_format_samples
    from vitune.eval.toy import task_items, vqa_items
    from vitune.world.render import render_world

    render_world(tmp_path / "w", scenes=60, eval_scenes=8, seed=1, size=48)
    records = benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0)
    types = {item.prompt.removeprefix("<image>\n"): item.fields["type"]
             for item in task_items("toy-vqa", tmp_path / "w", split="train", limit=60, seed=0)}
    assert len(records) == 60
    for r in records:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert not any("<image>" in t["value"] for t in turns[1:])
        assert all(t["value"].removeprefix("<image>\n") in types for t in turns[::2])  # the task's own questions
    first_types = {types[r["conversations"][0]["value"].removeprefix("<image>\n")] for r in records}
    assert len(first_types) >= 4, first_types
    # A mix without one of the formats (DemoConfig.mc_scenes=0) asks for no scenes of it.
    assert benchmark_format_samples(tmp_path / "w", "toy-scienceqa", 0, seed=0) == []
    # DemoConfig.vqa_per_type: more questions of the named types in each image's sample
    more = benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, per_type={"relation": 3})
    types.update({item.prompt.removeprefix("<image>\n"): item.fields["type"]
                  for item in vqa_items(tmp_path / "w", "train", 60, 0, per_type={"relation": 3})})

    def relation_turns(recs: list[dict]) -> int:
        return sum(types[t["value"].removeprefix("<image>\n")] == "relation" for r in recs for t in r["conversations"][::2])

    assert len(more) == 60 and relation_turns(more) > 1.5 * relation_turns(records)
    with pytest.raises(VituneError, match="toy-vqa setting"):
        benchmark_format_samples(tmp_path / "w", "toy-scienceqa", 60, seed=0, per_type={"relation": 3})
    # DemoConfig.vqa_per_object: as many relation questions as objects where that is more than
    # per_type's 2; scenes of two objects keep their questions, the same draw as toy-vqa's
    from vitune.eval.toy import load_scenes

    two = benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, per_type={"relation": 2})
    crowded = benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, per_type={"relation": 2},
                                       per_object={"relation": 1})
    objects = {s.image: len(s.instances) for s in load_scenes(tmp_path / "w", "train", 60)}
    types.update({item.prompt.removeprefix("<image>\n"): item.fields["type"]
                  for item in vqa_items(tmp_path / "w", "train", 60, 0, per_type={"relation": 4})})
    def questions(record: dict) -> set[str]:
        return {t["value"].removeprefix("<image>\n") for t in record["conversations"][::2]}

    for a, b in zip(two, crowded, strict=True):
        n, ra, rb = objects[a["image"]], relation_turns([a]), relation_turns([b])
        if n <= 2:  # the same questions (their order is drawn from one generator for all samples)
            assert questions(a) == questions(b)
        else:
            assert ra <= 2 and rb >= ra and rb <= n and questions(a) <= questions(b)
    assert relation_turns(crowded) > relation_turns(two)
    with pytest.raises(VituneError, match="per object: unknown type"):
        benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, per_object={"relations": 1})
    with pytest.raises(VituneError, match="toy-vqa setting"):
        benchmark_format_samples(tmp_path / "w", "toy-scienceqa", 60, seed=0, per_object={"relation": 1})
    # DemoConfig.later_turns: the short-answer instruction on each sample's first turn only ("bare"),
    # and the later turns answered in a sentence that starts with the subject ("sentence")
    from vitune.world.questions import SHORT_ANSWER_SUFFIX

    bare = benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, later_turns="bare")
    sentence = benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, later_turns="sentence")
    assert len(bare) == len(sentence) == len(records)
    for b, s_, full in zip(bare, sentence, records):
        a, c, f = b["conversations"], s_["conversations"], full["conversations"]
        assert a[:2] == c[:2] == f[:2] and a[0]["value"].endswith("\n" + SHORT_ANSWER_SUFFIX)
        assert [t["value"] + "\n" + SHORT_ANSWER_SUFFIX for t in a[2::2]] == [t["value"] for t in f[2::2]]
        assert a[3::2] == f[3::2] and a[2::2] == c[2::2]
        for question, short, long in zip(f[2::2], f[3::2], c[3::2]):
            kind = types[question["value"]]
            assert long["value"].endswith(".") and long["value"] != short["value"]
            if kind in ("color", "shape", "position", "relation"):  # the answer's words, after the subject
                assert short["value"] in long["value"] and long["value"].startswith("The "), (question, long)
    with pytest.raises(VituneError, match="later_turns"):
        benchmark_format_samples(tmp_path / "w", "toy-vqa", 60, seed=0, later_turns="long")
    with pytest.raises(VituneError, match="toy-vqa settings"):
        benchmark_format_samples(tmp_path / "w", "toy-scienceqa", 60, seed=0, later_turns="bare")


def test_demo_cli_passes_seed_and_out(monkeypatch, tmp_path: Path, capsys) -> None:
    import vitune.demo as demo
    from vitune.cli import main

    seen = {}
    monkeypatch.setattr(demo.Demo, "run", lambda self, fresh=False, only=None: seen.update(config=self.c, fresh=fresh) or {"ok": 1})
    main(["demo", "--preset", "quick", "--seed", "3", "--out", str(tmp_path / "d"), "--fresh"])
    assert (seen["config"].seed, seen["config"].out, seen["fresh"]) == (3, str(tmp_path / "d"), True)
    assert seen["config"].backbone_preset == PRESETS["quick"].backbone_preset
    main(["demo", "--seed", "2", "--set", "vqa_per_object={relation: 2, count: 1}", "--set", "time_budget=null",
          "--set", "named_kinds=color", "--set", "mix={detail: 7}", "--set", "stage2_overrides=[train.epochs=1]"])
    c = seen["config"]
    assert (c.seed, c.vqa_per_object, c.time_budget, c.named_kinds, c.mix, c.stage2_overrides) == (
        2, {"relation": 2, "count": 1}, None, ("color",), {"detail": 7}, ["train.epochs=1"])
    assert c.vqa_per_type == PRESETS["default"].vqa_per_type and c.out == "runs/demo"
    for bad, message in (("vqa_per_object={relation: many}", "demo.vqa_per_object.relation"),
                         ("vqa_per_object=3", "not a mapping"), ("scenes=lots", "demo.scenes"),
                         ("speed=9", "unknown key 'demo.speed'"), ("seed", "not key=value")):
        assert main(["demo", "--set", bad]) == 2
        assert message in capsys.readouterr().err


def test_named_object_samples_are_text_only_and_answered_by_their_own_words() -> None:
    from vitune.demo import named_object_samples
    from vitune.world.questions import SHORT_ANSWER_SUFFIX
    from vitune.world.scene import COLORS, SHAPES

    records = named_object_samples(50, 4, seed=0)
    assert len(records) == 50 and records == named_object_samples(50, 4, seed=0) != named_object_samples(50, 4, seed=1)
    answers = []
    for r in records:
        assert "image" not in r and r["kind"] == "named-object"
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 4
        for q, a in zip(turns[::2], turns[1::2]):
            assert "<image>" not in q["value"] and q["value"].endswith("\n" + SHORT_ANSWER_SUFFIX)
            words = q["value"].lower().replace("?", "").split()
            # the answer is the question's own colour or shape word, and the question names both
            assert a["value"] in words and {w for w in words if w in COLORS} and {w for w in words if w in SHAPES}
            answers.append(a["value"])
    assert {a for a in answers if a in COLORS} and {a for a in answers if a in SHAPES}
    assert named_object_samples(0, 4, seed=0) == []
    bare = named_object_samples(50, 4, seed=0, later_turns="bare")
    assert [t["value"] for r in bare for t in r["conversations"][2::2]] == [
        t["value"].removesuffix("\n" + SHORT_ANSWER_SUFFIX) for r in records for t in r["conversations"][2::2]]
    assert [r["conversations"][:2] for r in bare] == [r["conversations"][:2] for r in records]
    sentence = named_object_samples(50, 4, seed=0, later_turns="sentence")
    for r, full in zip(sentence, records):
        for long, short in zip(r["conversations"][3::2], full["conversations"][3::2]):
            assert long["value"].startswith("The ") and long["value"].endswith(f" {short['value']}.") or f"a {short['value']}." in long["value"]
    with pytest.raises(VituneError, match="named-object samples"):
        named_object_samples(3, 0, seed=0)
    # the "object" kind asks the whole phrase back: both words of the question, in its order
    mixed = named_object_samples(60, 4, seed=0, kinds=("color", "shape", "object"))
    phrases = [(q["value"].lower(), a["value"]) for r in mixed for q, a in zip(r["conversations"][::2], r["conversations"][1::2])
               if " " in a["value"]]
    assert phrases and all(f"{a} " in q or f"{a}?" in q or f"{a}." in q for q, a in phrases), phrases[:3]
    assert all(a.split()[0] in COLORS and a.split()[1] in SHAPES for _, a in phrases)
    with pytest.raises(VituneError, match="named-object question kinds"):
        named_object_samples(3, 2, seed=0, kinds=("size",))
