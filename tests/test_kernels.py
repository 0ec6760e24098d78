"""The decode-step kernel choice: same numbers as F.linear whichever kernel wins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitune.model import kernels


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_chosen", {})


@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear(rows: int, bias: bool) -> None:
    w = torch.randn(300, 64)
    b = torch.randn(300) if bias else None
    x = torch.randn(rows, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.decode_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernels._onednn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert len(kernels.choices()) == 1  # measured once, for this rows x shape


def test_large_products_and_gradients_stay_on_f_linear() -> None:
    w = torch.randn(8, 4, requires_grad=True)
    assert kernels.linear_for(kernels.MAX_ROWS + 1, [(w, None)], torch.float32) is F.linear
    x = torch.randn(2, 4)
    y = kernels.decode_linear(x, w)  # gradients enabled: F.linear, whose backward is known
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 4))
    assert kernels.choices() == {}


def test_linear_for_dispatches_only_when_onednn_won(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(16, 8)
    with torch.inference_mode():
        monkeypatch.setattr(kernels, "_choose", lambda *_: F.linear)
        assert kernels.linear_for(1, [(w, None)], torch.float32) is F.linear
        monkeypatch.setattr(kernels, "_chosen", {})
        monkeypatch.setattr(kernels, "_choose", lambda *_: kernels._onednn)
        assert kernels.linear_for(1, [(w, None)], torch.float32) is kernels.decode_linear
        assert list(kernels.choices().values()) == ["onednn"]


def test_onednn_is_taken_only_if_it_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(16, 8)
    timings = iter([1.0, 2.0])  # oneDNN measured first, then F.linear
    monkeypatch.setattr(kernels, "_seconds", lambda fn: next(timings))
    assert kernels._choose(1, w, None) is kernels._onednn
    timings = iter([1.0, 1.05])  # within the noise margin: keep the default
    assert kernels._choose(1, w, None) is F.linear
