"""The last decoder layer at label positions only: the same loss and gradients as the full
decoder forward (padding, images, grouped-query attention, tied heads, eager attention), and the
plain path wherever the layer structure is not one it knows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitune.model.llava import LlavaModel
from vitune.templates import IGNORE_INDEX
from vitune.testing import make_tiny_backbones
from vitune.train import label_positions, model_setup


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[0, :9] = IGNORE_INDEX  # rows with different label counts and places
    labels[1, :3] = IGNORE_INDEX
    labels[1, 5:7] = IGNORE_INDEX
    labels[2, :5] = IGNORE_INDEX
    return ids, mask, labels


def _loss_and_grads(model: LlavaModel, plain: bool, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    with monkeypatch.context() as m:
        if plain:
            m.setattr(label_positions, "supported", lambda decoder, length: False)
        module = model_setup.TrainingModule(model)
        model.zero_grad(set_to_none=True)
        loss = module(**kw)
        loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_same(model: LlavaModel, monkeypatch: pytest.MonkeyPatch, **kw) -> None:
    fast, g_fast = _loss_and_grads(model, False, monkeypatch, **kw)
    plain, g_plain = _loss_and_grads(model, True, monkeypatch, **kw)
    assert fast == pytest.approx(plain, rel=1e-5) and fast > 0
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 0
    for name in g_fast:
        assert torch.allclose(g_fast[name], g_plain[name], rtol=1e-4, atol=1e-6), name


def test_label_slots_order_matches_the_boolean_selection() -> None:
    keep = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    positions, flat = label_positions.label_slots(keep)
    assert positions.tolist() == [[1, 3, 4], [0, 0, 0], [0, 4, 0]]
    grid = torch.arange(15).view(3, 5)
    assert positions.flatten()[flat].tolist() == [p for p in (grid[keep] % 5).tolist()]


def test_same_loss_and_gradients_as_the_full_decoder(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlavaModel.from_pretrained(tiny_model_dir)  # Llama, 4 query heads over 2 key/value heads
    assert label_positions.supported(model.language_model.get_decoder(), 14)
    ids, mask, labels = _batch(model.language_model.config.vocab_size)
    _check_same(model, monkeypatch, input_ids=ids, attention_mask=mask, labels=labels)


def test_same_with_images_and_eager_attention(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlavaModel.from_pretrained(tiny_model_dir)
    model.language_model.config._attn_implementation = "eager"
    ids, mask, labels = _batch(model.language_model.config.vocab_size)
    n = model.config.num_image_tokens
    image_id = model.config.image_token_id
    ids = torch.cat([ids[:, :1], torch.full((3, n), image_id), ids[:, 1:]], dim=1)
    mask = torch.cat([mask[:, :1], torch.ones(3, n, dtype=mask.dtype), mask[:, 1:]], dim=1)
    labels = torch.cat([labels[:, :1], torch.full((3, n), IGNORE_INDEX), labels[:, 1:]], dim=1)
    size = model.vision.tower.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    _check_same(model, monkeypatch, input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)
    assert any(p.grad is not None for p in model.projector.parameters())


def test_same_on_a_tied_qwen2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitune.model.build import build_llava

    vision, llm = make_tiny_backbones(tmp_path, llm="qwen2")
    model, _ = build_llava(str(vision), str(llm))
    ids, mask, labels = _batch(model.language_model.config.vocab_size)
    _check_same(model, monkeypatch, input_ids=ids, attention_mask=mask, labels=labels)


def test_unknown_layers_and_short_windows_take_the_plain_path(tiny_model_dir: Path) -> None:
    decoder = LlavaModel.from_pretrained(tiny_model_dir).language_model.get_decoder()
    assert label_positions.supported(decoder, 14)
    decoder.config.sliding_window = 8
    assert not label_positions.supported(decoder, 14) and label_positions.supported(decoder, 8)
    decoder.config.sliding_window = None
    decoder.layers.append(torch.nn.Identity())
    assert not label_positions.supported(decoder, 14)
