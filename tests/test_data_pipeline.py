"""Tokens, token budget, batches: the dataset equals the processor's encoding, truncation never
cuts an image, the collator pads and orders images as the placeholders, the sampler groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitune.data.collate import Collator
from vitune.data.dataset import Quarantine, SupervisedDataset, prepare_data, truncate_sample
from vitune.data.sampler import plan_epoch, rank_micro_batches
from vitune.data.tiny import make_tiny_dataset
from vitune.templates import IGNORE_INDEX

IMG = 99


def test_truncation_fits_untouched() -> None:
    ids = np.array([1, IMG, 5, 6, 7], np.int32)
    sup = np.array([0, 0, 0, 1, 1], bool)
    out = truncate_sample(ids, sup, IMG, 4, 8)  # expanded length 1 + 4 + 3 = 8
    assert not isinstance(out, str) and out[0].tolist() == ids.tolist()


def test_truncation_cuts_after_the_images() -> None:
    ids = np.array([1, IMG, 5, 6, 7, 8, 9], np.int32)
    sup = np.array([0, 0, 0, 1, 1, 1, 1], bool)
    out = truncate_sample(ids, sup, IMG, 4, 8)
    assert not isinstance(out, str)
    assert out[0].tolist() == [1, IMG, 5, 6, 7]  # 1 + 4 + 3 = 8 expanded tokens
    assert out[1].tolist() == [False, False, False, True, True]


def test_truncation_never_cuts_through_an_image() -> None:
    ids = np.array([1, 5, IMG, 6, 7], np.int32)
    sup = np.array([0, 0, 0, 1, 1], bool)
    reason = truncate_sample(ids, sup, IMG, 4, 4)  # the image spans expanded tokens 2..5
    assert isinstance(reason, str) and "inside image 0" in reason and "tokens 2-5" in reason
    ids2 = np.array([1, 5, 6, 7, IMG, 8], np.int32)
    reason2 = truncate_sample(ids2, np.array([0, 0, 0, 0, 0, 1], bool), IMG, 4, 3)
    assert isinstance(reason2, str) and "before image 0" in reason2


def test_truncation_without_answer_left_is_skipped() -> None:
    ids = np.array([1, IMG, 5, 6, 7, 8], np.int32)
    sup = np.array([0, 0, 0, 0, 1, 1], bool)
    reason = truncate_sample(ids, sup, IMG, 4, 7)
    assert isinstance(reason, str) and "no answer token" in reason


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    from vitune.processor import LlavaProcessor

    return LlavaProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tinydata"), n=24, stage=2, text_only=0.3, seed=1)


def test_dataset_tokens_equal_the_processor(processor, tiny_data: Path) -> None:
    data = prepare_data([tiny_data], processor, processor.template, 1024, chunk_size=5)  # batched across chunks
    ds = SupervisedDataset(data, processor)
    records = json.loads(tiny_data.read_text())
    assert len(ds) == len(records)
    for i, rec in enumerate(records):
        enc = processor.encode(rec["conversations"], num_images=1 if "image" in rec else 0)
        item = ds[i]
        assert item["input_ids"].tolist() == enc.input_ids
        assert item["labels"].tolist() == enc.labels
        assert data.lengths[i] == len(enc.input_ids)
        assert data.num_supervised[i] == sum(1 for x in enc.labels[1:] if x != IGNORE_INDEX)
        if "image" in rec:
            assert len(item["images"]) == 1
            assert (item["input_ids"] == processor.config.image_token_id).sum() == processor.config.num_image_tokens


def test_max_length_counts_image_placeholders(processor, tiny_data: Path, tmp_path: Path) -> None:
    t = processor.config.num_image_tokens
    full = prepare_data([tiny_data], processor, processor.template, 4096)
    budget = int(full.lengths[full.has_image].min()) - 1
    assert budget > t
    q = Quarantine(tmp_path / "q.jsonl")
    cut = prepare_data([tiny_data], processor, processor.template, budget, quarantine=q)
    q.close()
    assert cut.lengths.max() <= budget
    assert cut.truncated + sum(cut.skipped.values()) >= int((full.lengths > budget).sum())
    assert len(cut) + sum(cut.skipped.values()) == full.num_records
    ds = SupervisedDataset(cut, processor)
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        assert len(ids) <= budget
        # every image that is there is whole
        assert (ids == processor.config.image_token_id).sum() % t == 0
    # a budget smaller than the image itself skips image samples with the reason, in error mode too
    q2 = Quarantine(tmp_path / "q2.jsonl")
    tiny = prepare_data([tiny_data], processor, processor.template, t, quarantine=q2, on_bad_record="error")
    q2.close()
    assert not tiny.has_image.any()
    lines = [json.loads(x) for x in (tmp_path / "q2.jsonl").read_text().splitlines()]
    assert len(lines) == tiny.skipped["too_long"] == full.num_records - len(tiny)
    image_reasons = [x["reason"] for x in lines if "image" in x["record"]]
    assert len(image_reasons) == int(full.has_image.sum())
    assert all("max_length" in r and "image 0's placeholders" in r for r in image_reasons)


def test_collator_pads_and_orders_images(processor, tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    colors = {"r": (255, 0, 0), "g": (0, 255, 0), "b": (0, 0, 255)}
    for name, c in colors.items():
        Image.new("RGB", (16, 16), c).save(tmp_path / "images" / f"{name}.png")
    recs = [
        {"id": "two", "image": ["images/r.png", "images/g.png"],
         "conversations": [{"from": "human", "value": "<image> and <image>: which is first?"}, {"from": "gpt", "value": "red."}]},
        {"id": "one", "image": "images/b.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "blue, blue, blue."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello."}]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    data = prepare_data([path], processor, processor.template, 1024)
    ds = SupervisedDataset(data, processor)
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad, pad_to_multiple_of=8, preprocess=processor.preprocess_images)([ds[0], ds[1], ds[2]])
    n = [len(ds[i]["input_ids"]) for i in range(3)]
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(n)
    for row in range(3):
        assert batch["attention_mask"][row].sum() == n[row]
        assert (batch["labels"][row, n[row]:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n[row]:] == pad).all()
        assert batch["input_ids"][row, : n[row]].tolist() == ds[row]["input_ids"].tolist()
    # pixel rows follow the placeholders: red, green (sample 0), then blue (sample 1)
    px = batch["pixel_values"]
    assert px.shape[0] == 3
    means = px.mean(dim=(2, 3))
    assert means[0].argmax() == 0 and means[1].argmax() == 1 and means[2].argmax() == 2
    keys = batch["image_keys"].tolist()
    assert [data.image_paths[k].rsplit("/", 1)[1] for k in keys] == ["r.png", "g.png", "b.png"]
    assert batch["pixel_keys"].tolist() == keys
    # cached images need no pixels
    ds.cached[:] = True
    assert ds[0]["images"] is None
    assert Collator(pad)([ds[0], ds[2]])["pixel_values"] is None


def test_sampler_groups_by_modality_and_length() -> None:
    rng = np.random.default_rng(0)
    n = 203
    lengths = rng.integers(10, 500, n)
    has_image = rng.random(n) < 0.6
    plan = plan_epoch(lengths, has_image, global_batch=16, micro_batch=4, seed=3, epoch=0)
    assert len(plan) == n // 16
    seen = [i for step in plan for mb in step for i in mb]
    assert len(seen) == len(set(seen)) == len(plan) * 16
    mixed_steps = sum(1 for step in plan if len({bool(has_image[i]) for mb in step for i in mb}) > 1)
    assert mixed_steps <= 1  # only the step made of both modalities' remainders
    assert plan == plan_epoch(lengths, has_image, 16, 4, seed=3, epoch=0)
    assert plan != plan_epoch(lengths, has_image, 16, 4, seed=3, epoch=1)
    for step in plan:
        per_rank = [rank_micro_batches(step, r, 2) for r in range(2)]
        assert sorted(i for r in per_rank for mb in r for i in mb) == sorted(i for mb in step for i in mb)
        assert all(len(r) == 2 for r in per_rank)

    def padding(p):
        return sum(len(mb) * max(lengths[mb]) - lengths[mb].sum() for step in p for mb in step)

    grouped = plan_epoch(lengths, has_image, 16, 4, seed=3, epoch=0, length_window=8)
    random_ = plan_epoch(lengths, has_image, 16, 4, seed=3, epoch=0, group_by_modality_length=False)
    assert padding(grouped) < padding(plan) < padding(random_)


def test_runtime_image_failure_is_reported(processor, tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "ok.png")
    # a PNG whose header is fine but whose data is cut short: passes the up-front header check
    full = tmp_path / "images" / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    (tmp_path / "images" / "cut.png").write_bytes(full.read_bytes()[:200])
    recs = [{"id": "cut", "image": "images/cut.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x."}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    data = prepare_data([path], processor, processor.template, 1024)
    assert len(data) == 1
    item = SupervisedDataset(data, processor, on_bad_record="skip")[0]
    assert item["bad"].record_id == "'cut'" and item["bad"].kind == "image_undecodable"
    batch = Collator(0)([item])
    assert batch["indices"] == [] and len(batch["bad"]) == 1
    with pytest.raises(Exception, match="cut"):
        SupervisedDataset(data, processor, on_bad_record="error")[0]
    # decode-level checking catches it up front instead
    q = Quarantine(None)
    checked = prepare_data([path], processor, processor.template, 1024, check_images="decode", on_bad_record="skip", quarantine=q)
    assert len(checked) == 0 and checked.skipped == {"image_undecodable": 1}
    assert isinstance(batch["input_ids"], torch.Tensor)
