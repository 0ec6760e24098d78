"""The training loop on the tiny model: stages change exactly their parts, outputs chain from
stage 1 to stage 2, the loss drops, resume reproduces the losses, LoRA merges exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitune.cpu import flushing_subnormals
from vitune.data.tiny import make_tiny_dataset
from vitune.errors import VituneError
from vitune.train.config import load_config
from vitune.train.trainer import run_training

FAST = ["train.progress=false", "train.log_every=1", "optim.warmup_ratio=0", "data.check_images=open", "train.compile=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("traindata")
    make_tiny_dataset(root, n=24, stage=1, seed=0)
    make_tiny_dataset(root, n=24, stage=2, text_only=0.25, seed=0)
    return root


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def stage1(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 through the CLI, with one bad record skipped into the quarantine."""
    from vitune.cli import main

    data = json.loads((data_dir / "stage1.json").read_text())
    data.append({"id": "ghost", "image": "images/ghost.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a."}]})
    path = data_dir / "stage1_bad.json"
    path.write_text(json.dumps(data))
    out = tmp_path_factory.mktemp("runs") / "stage1"
    preset = out.parent / "s1.yaml"
    preset.write_text("inherit: world-stage1\ntrain: {batch_size: 8, micro_batch_size: 4, epochs: 1}\n")
    code = main(["train", str(preset), f"model.path={tiny_model_dir}", f"data.path={path}", f"data.image_folder={data_dir}",
                 f"train.output_dir={out}", "stage.parts.projector=5e-3", *FAST, "--on-bad-record", "skip"])
    assert code == 0
    return out


def test_stage1_trains_only_the_projector(stage1: Path, tiny_model_dir: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "model", "projector", "summary.json", "quarantine.jsonl"):
        assert (stage1 / name).exists(), name
    diff = changed(weights(tiny_model_dir), weights(stage1 / "model"))
    assert diff and all(k.startswith("projector.") for k in diff)
    assert diff == {k for k in weights(tiny_model_dir) if k.startswith("projector.")}
    proj = load_file(str(stage1 / "projector" / "projector.safetensors"))
    full = weights(stage1 / "model")
    assert set(proj) == {k.removeprefix("projector.") for k in diff}  # the projector and nothing else
    assert all(torch.equal(v, full[f"projector.{k}"]) for k, v in proj.items())
    # the bad record was skipped, quarantined with its reason, and counted
    (line,) = [json.loads(x) for x in (stage1 / "quarantine.jsonl").read_text().splitlines()]
    assert line["id"] == "'ghost'" and line["kind"] == "image_missing"
    summary = json.loads((stage1 / "summary.json").read_text())
    assert summary["data"]["skipped"] == 1 and summary["data"]["kept"] == 24
    rows = [json.loads(x) for x in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all({"loss", "lr", "samples_per_s"} <= r.keys() for r in rows)
    # the output model keeps its chat template (plain is only stage 1's format)
    assert json.loads((stage1 / "model" / "config.json").read_text())["template"] == "vicuna_v1"


@pytest.fixture(scope="module")
def stage2(stage1: Path, tiny_model_dir: Path, data_dir: Path) -> Path:
    cfg = load_config("world-stage2", [f"model.path={tiny_model_dir}", f"model.projector={stage1}",
                                       f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
                                       f"train.output_dir={stage1.parent / 'stage2'}", "train.batch_size=8",
                                       "train.micro_batch_size=8", "train.epochs=1", *FAST])
    return run_training(cfg)


def test_stage2_starts_from_stage1_and_freezes_vision(stage1: Path, stage2: Path, tiny_model_dir: Path) -> None:
    from vitune.train.model_setup import load_for_training

    cfg = load_config(stage2 / "config.yaml")
    model, _ = load_for_training(cfg)
    s1 = load_file(str(stage1 / "projector" / "projector.safetensors"))
    assert all(torch.equal(v, model.projector.state_dict()[k]) for k, v in s1.items())
    base = weights(tiny_model_dir)
    diff = changed(base, weights(stage2 / "model"))
    assert not any(k.startswith("vision.") for k in diff)
    trainable = {k for k in base if k.startswith(("projector.", "language_model."))}
    assert diff == trainable


def test_stage2_model_serves(stage2: Path) -> None:
    from vitune.data.tiny import draw_shape
    from vitune.inference import GenerationRequest, Pipeline, SamplingParams

    pipe = Pipeline.from_pretrained(stage2 / "model")
    out = pipe.generate([GenerationRequest([{"role": "user", "content": "<image>\nwhat color is the shape?"}],
                                           [draw_shape("red", "circle")], SamplingParams(max_new_tokens=4))])
    assert len(out[0].output_ids) >= 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_drops_on_a_fixed_batch(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, optimizer: str) -> None:
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", "data.limit=8",
                             "stage.parts.projector=3e-3", "stage.parts.llm=3e-3", "train.batch_size=8",
                             "train.micro_batch_size=8", "train.max_steps=30", "optim.schedule=constant",
                             f"optim.name={optimizer}", f"train.output_dir={tmp_path / 'run'}", *FAST])
    run = run_training(cfg)
    got = losses(run)
    assert len(got) == 30
    assert got[-1] < 0.5 * got[0], got
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("lr/llm.muon" in logged) == (optimizer == "muon")


def test_lora_trains_adapters_and_projector_and_merges_exactly(stage1: Path, tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from vitune.cli import main
    from vitune.model.llava import LlavaModel

    cfg = load_config("world-stage2", [f"model.path={tiny_model_dir}", f"model.projector={stage1}",
                                       f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
                                       f"train.output_dir={tmp_path / 'lora'}", "train.batch_size=8", "train.micro_batch_size=8",
                                       "train.max_steps=4", "stage.lora.r=4", "stage.lora.alpha=8", "stage.lora.dropout=0",
                                       "stage.parts.llm=5e-3", "stage.parts.projector=5e-3", *FAST])
    run = run_training(cfg)
    adapter = load_file(str(run / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero: it trained
    s1 = weights(stage1 / "model")
    merged = weights(run / "model")
    diff = changed(s1, merged)
    assert not any(k.startswith("vision.") for k in diff)
    assert {k for k in s1 if k.startswith("projector.")} <= diff
    llm_diff = {k for k in diff if k.startswith("language_model.")}
    assert llm_diff and all(k.endswith("proj.weight") for k in llm_diff)  # only the adapted linear layers
    assert not any("embed_tokens" in k or "norm" in k or "lm_head" in k for k in diff)

    # unmerged (base + adapter + run projector) and merged give the same logits
    base = LlavaModel.from_pretrained(tiny_model_dir)
    base.load_projector(run / "projector")
    base.language_model = PeftModel.from_pretrained(base.language_model, str(run / "lora"))
    base.eval()
    merged_model = LlavaModel.from_pretrained(run / "model")
    torch.manual_seed(0)
    vocab = merged_model.language_model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab - 2, (2, 40))
    ids[ids == base.config.image_token_id] = 3
    ids[:, 2 : 2 + base.config.num_image_tokens] = base.config.image_token_id
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = base(ids, pixel_values=pixels).logits
        b = merged_model(ids, pixel_values=pixels).logits
    assert (a - b).abs().max() < 1e-4
    plain = LlavaModel.from_pretrained(tiny_model_dir)
    plain.load_projector(run / "projector")
    with torch.no_grad():
        assert (plain(ids, pixel_values=pixels).logits - b).abs().max() > 1e-3  # the adapters do something

    # `vitune merge-lora` rebuilds the same merged model from the run
    assert main(["merge-lora", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    again = weights(tmp_path / "merged")
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_the_uninterrupted_losses(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, optimizer: str) -> None:
    common = [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
              "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "stage.lora=null", "train.batch_size=4",
              "train.micro_batch_size=2", "train.max_steps=6", "optim.warmup_steps=2", "train.save_every=2",
              "train.keep_last=2", f"optim.name={optimizer}", "optim.muon_lr_scale=2", *FAST]
    full = run_training(load_config(None, [*common, f"train.output_dir={tmp_path / 'full'}"]))
    part_dir = tmp_path / "part"
    cfg = load_config(None, [*common, f"train.output_dir={part_dir}"])
    flushing: list[bool] = []
    stopped = run_training(cfg, on_step=lambda m: flushing.append(flushing_subnormals()) or m["step"] == 3)
    assert flushing == [True] * 3 and not flushing_subnormals()  # subnormals flushed only while training
    assert not (stopped / "model").exists()
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    with pytest.raises(VituneError, match="--resume"):
        run_training(cfg)  # a fresh run would overwrite it
    run_training(cfg, resume=True)
    a, b = losses(full), losses(part_dir)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
    assert changed(weights(full / "model"), weights(part_dir / "model")) == set() or all(
        torch.allclose(weights(full / "model")[k], weights(part_dir / "model")[k], atol=1e-6) for k in weights(full / "model"))


@pytest.mark.parametrize("llm", ["full", "lora"])
def test_export_checkpoint_gives_the_model_of_that_step(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, llm: str) -> None:
    from vitune.cli import main
    from vitune.train.trainer import export_checkpoint

    with_lora, without = ["stage.lora.r=4", "stage.lora.alpha=8", "stage.lora.dropout=0"], ["stage.lora=null"]
    base = [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
            "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "train.batch_size=4", "train.micro_batch_size=4",
            "optim.schedule=constant", "optim.warmup_steps=0", "train.save_every=2", *FAST]
    common = [*base, *(with_lora if llm == "lora" else without)]
    long = run_training(load_config(None, [*common, "train.max_steps=4", f"train.output_dir={tmp_path / 'long'}"]))
    short = run_training(load_config(None, [*common, "train.max_steps=2", f"train.output_dir={tmp_path / 'short'}"]))
    # the long run's step-2 checkpoint, completed, is the short run's final model
    assert main(["export-checkpoint", str(long), "--out", str(tmp_path / "at2")]) == 0
    exported, expected = weights(tmp_path / "at2" / "model"), weights(short / "model")
    assert exported.keys() == expected.keys()
    assert all(torch.allclose(exported[k], expected[k], atol=1e-6) for k in expected)
    assert changed(expected, weights(long / "model"))  # steps 3-4 moved the weights: not the end of the run
    assert (tmp_path / "at2" / "projector" / "projector_config.json").is_file()
    assert (tmp_path / "at2" / "lora").is_dir() == (llm == "lora")
    assert (json.loads((tmp_path / "at2" / "model" / "config.json").read_text())["template"]
            == json.loads((short / "model" / "config.json").read_text())["template"])

    with pytest.raises(VituneError, match="already exists"):
        export_checkpoint(long / "checkpoints" / "step-000002", tmp_path / "at2")
    with pytest.raises(VituneError, match="neither a training checkpoint"):
        export_checkpoint(short, tmp_path / "none")  # the 2-step run saved no checkpoint before its end
    sharded = tmp_path / "fsdp" / "checkpoints" / "step-000002"
    sharded.mkdir(parents=True)
    (sharded / "trainer_state.json").write_text("{}")
    with pytest.raises(VituneError, match="sharded format: merge"):
        export_checkpoint(sharded, tmp_path / "none")
    other = load_config(None, [*base, *(without if llm == "lora" else with_lora), "train.max_steps=4", f"train.output_dir={long}"])
    (long / "config.yaml").write_text(other.to_yaml())  # a config the checkpoint was not saved with
    with pytest.raises(VituneError, match="different stage config"):
        export_checkpoint(long, tmp_path / "mismatch")
    assert not (tmp_path / "mismatch" / "model").exists()


def test_feature_cache_gives_the_same_losses(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    common = [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
              "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "train.batch_size=8", "train.micro_batch_size=4",
              "train.epochs=2", *FAST]
    on = run_training(load_config(None, [*common, "train.cache_image_features=on", f"train.output_dir={tmp_path / 'on'}"]))
    off = run_training(load_config(None, [*common, "train.cache_image_features=off", f"train.output_dir={tmp_path / 'off'}"]))
    assert json.loads((on / "summary.json").read_text())["feature_cache"] is True
    assert json.loads((off / "summary.json").read_text())["feature_cache"] is False
    assert losses(on) == pytest.approx(losses(off), rel=1e-5)


@pytest.mark.parametrize("vocabulary_head", ["labels only", "full logits"])
def test_sample_weights_scale_each_rows_loss(tiny_model_dir: Path, vocabulary_head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weighted loss is each row's summed cross-entropy times its weight, on both loss paths."""
    from vitune.templates import IGNORE_INDEX
    from vitune.model.llava import LlavaModel
    from vitune.train import model_setup

    if vocabulary_head == "full logits":
        monkeypatch.setattr(model_setup, "_decoder_and_head", lambda lm: None)
    module = model_setup.TrainingModule(LlavaModel.from_pretrained(tiny_model_dir)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # 2 label tokens (the first position is never predicted)
    labels[1, :4] = IGNORE_INDEX  # 7
    labels[2, :] = IGNORE_INDEX  # none
    with torch.no_grad():
        rows = [float(module(ids[i:i + 1], mask[i:i + 1], labels[i:i + 1])) for i in range(3)]
        assert float(module(ids, mask, labels)) == pytest.approx(sum(rows), rel=1e-5)
        weights = torch.tensor([0.5, 1 / 7, 3.0])
        weighted = float(module(ids, mask, labels, sample_weights=weights))
    assert rows[0] > 0 and rows[1] > 0 and rows[2] == 0
    assert weighted == pytest.approx(0.5 * rows[0] + rows[1] / 7, rel=1e-5)


def test_loss_weighting_is_independent_of_the_batch_split(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """Per-sample weighting divides by the global batch's total weight: accumulation changes nothing."""
    common = [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
              "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "train.batch_size=8", "train.max_steps=3", *FAST]
    runs = {}
    for name, extra in {"token": ["train.micro_batch_size=8"], "sample": ["train.micro_batch_size=8"],
                        "sample-accum": ["train.micro_batch_size=2"], "square": ["train.micro_batch_size=4"]}.items():
        weighting = name.split("-")[0]
        runs[name] = losses(run_training(load_config(None, [*common, *extra, f"train.loss_weighting={weighting}",
                                                            f"train.output_dir={tmp_path / name}"])))
    assert runs["sample-accum"] == pytest.approx(runs["sample"], rel=1e-5)
    # the three weightings see the same first batch from the same weights, yet average it differently
    first = [runs[k][0] for k in ("token", "sample", "square")]
    assert len({round(x, 5) for x in first}) == 3


def test_compiled_decoder_trains_the_same(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """train.compile=true changes the speed, not the numbers, nor the saved weights' names."""
    common = [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
              "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "train.batch_size=8", "train.micro_batch_size=4",
              "train.max_steps=3", *FAST]
    eager = run_training(load_config(None, [*common, f"train.output_dir={tmp_path / 'eager'}"]))
    compiled = run_training(load_config(None, [*common, "train.compile=true", f"train.output_dir={tmp_path / 'compiled'}"]))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    a, b = weights(eager / "model"), weights(compiled / "model")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_qlora_on_cpu_is_a_clear_error(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", "stage.parts.llm=1e-4",
                             "stage.lora.bits=4", "train.batch_size=4", "train.micro_batch_size=4", f"train.output_dir={tmp_path}", *FAST])
    with pytest.raises(VituneError, match="QLoRA .*CUDA"):
        run_training(cfg)


def test_check_data_and_tracker_errors(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitune.cli import main

    bad = json.loads((data_dir / "stage2.json").read_text())
    bad.insert(1, {"id": "q", "image": "images/00001.png", "conversations": [{"from": "gpt", "value": "<image> x"}, {"from": "human", "value": "y"}]})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    args = ["train", "world-stage2", f"model.path={tiny_model_dir}", f"data.path={path}", f"data.image_folder={data_dir}", "train.progress=false"]
    assert main([*args, "--check-data", str(tmp_path / "q.jsonl"), "--on-bad-record", "skip"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 25 and report["kept"] == 24 and report["skipped_by_kind"] == {"roles_out_of_order": 1}
    assert json.loads((tmp_path / "q.jsonl").read_text())["field"] == "conversations[0].from"
    assert main([*args, "--check-data"]) == 2  # error mode: the CLI reports the record and fails
    assert "record 'q': field 'conversations[0].from': roles out of order" in capsys.readouterr().err
    assert not any(tmp_path.glob("runs*"))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", "stage.parts.llm=1e-4",
                             "train.report_to=[neptune]", f"train.output_dir={tmp_path / 'r'}", *FAST])
    with pytest.raises(VituneError, match="unknown tracker 'neptune'"):
        run_training(cfg)


def test_max_seconds_finishes_the_run_early_with_an_exported_model(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    common = [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
              "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "train.batch_size=8", "train.micro_batch_size=8",
              "train.max_steps=50", "train.log_every=10", f"train.output_dir={tmp_path / 'run'}", *FAST[:1], *FAST[2:]]
    run = run_training(load_config(None, [*common, "train.max_seconds=1e-9"]))  # out of time after the first step
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["planned_steps"], summary["stopped_by"]) == (1, 50, "max_seconds")
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]  # logged though off the log_every grid
    assert (run / "model" / "model.safetensors").is_file() and not (run / "checkpoints").exists()
    with pytest.raises(VituneError, match="train.max_seconds must be a positive"):
        load_config(None, [*common, "train.max_seconds=0"]).check()


def test_max_seconds_ends_the_schedule_with_the_time(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """A wsd run planned far past its time allowance still cools down before the time is up (here over
    the whole run, so that even a few steps on a busy machine end well below the peak)."""
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.path={data_dir / 'stage2.json'}", f"data.image_folder={data_dir}",
                             "stage.parts.projector=2e-3", "stage.parts.llm=2e-3", "train.batch_size=4", "train.micro_batch_size=4",
                             "train.max_steps=100000", "train.max_seconds=5", "optim.schedule=wsd", "optim.decay_ratio=1",
                             f"train.output_dir={tmp_path / 'run'}", *FAST])
    run = run_training(cfg)
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max_seconds" and summary["steps"] == len(lrs) >= 4
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] < 0.4 * 2e-3, lrs
