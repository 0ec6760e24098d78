"""Muon (vitune.train.optim): the orthogonalisation, the update's size, which weights it takes,
and the combined optimizer's groups and state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vitune.errors import VituneError
from vitune.train.optim import Muon, MuonWithAdamW, build_optimizer, muon_matrices, orthogonalize, split_muon_groups


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_orthogonalize_flattens_the_singular_values(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    # A badly conditioned matrix: singular values from 1e-3 to 10.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    s = torch.logspace(-3, 1, k)
    m = u[:, :k] @ torch.diag(s) @ v[:k, :]
    out = orthogonalize(m)
    assert out.shape == m.shape and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out)
    # The quintic iteration lands near 1, not on it; the smallest directions are pulled up by >100x.
    assert sv.max() < 1.3 and sv[: k // 2].min() > 0.6, sv
    # Same singular vectors: out ~ U V^T, so out^T m is symmetric positive semi-definite up to the iteration's error.
    assert torch.allclose(u[:, :k].T @ out @ v[:k, :].T, torch.diag(torch.diag(u[:, :k].T @ out @ v[:k, :].T)), atol=0.05)


def test_muon_update_matches_adamw_rms_and_decays_weights() -> None:
    w = nn.Parameter(torch.zeros(32, 96))
    opt = Muon([w], lr=1e-2, momentum=0.0)
    w.grad = torch.randn(32, 96)
    opt.step()
    rms = w.detach().pow(2).mean().sqrt().item()
    assert 0.2 * 1e-2 * 0.7 < rms < 0.2 * 1e-2 * 1.3  # AdamW's update RMS is ~0.2 x lr once its moments settle
    w2 = nn.Parameter(torch.ones(8, 8))
    decayed = Muon([w2], lr=0.1, weight_decay=0.5, momentum=0.0)
    w2.grad = torch.zeros(8, 8)
    decayed.step()
    assert torch.allclose(w2.detach(), torch.full((8, 8), 0.95))  # 1 - lr x wd, and a zero gradient moves nothing


def test_muon_refuses_non_matrices() -> None:
    with pytest.raises(VituneError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])


class TinyLM(nn.Module):
    """The shape of what Muon sees in a LLaVA model: embeddings, linear layers, norms, a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8))
        self.language_model = nn.Module()
        lm = self.language_model
        lm.embed = nn.Embedding(20, 8)
        lm.mlp = nn.Linear(8, 8, bias=False)
        lm.norm = nn.LayerNorm(8)
        lm.head = nn.Linear(8, 20, bias=False)
        lm.head.weight = lm.embed.weight
        lm.get_output_embeddings = lambda: lm.head  # type: ignore[method-assign]


def test_muon_takes_hidden_matrices_only() -> None:
    model = TinyLM()
    ids = muon_matrices(model)
    lm = model.language_model
    assert ids == {id(model.projector[0].weight), id(model.projector[2].weight), id(lm.mlp.weight)}


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.0, "name": "llm/decay"},
            {"params": no_decay, "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.0, "name": "llm/no_decay"}]


def test_groups_split_with_their_own_learning_rate() -> None:
    model = TinyLM()
    split = split_muon_groups(_groups(model), muon_matrices(model), lr_scale=2.0)
    assert [(g["name"], g.get("muon", False), g["lr"], g["base_lr"], len(g["params"])) for g in split] == [
        ("llm.muon/decay", True, 2e-2, 2e-2, 3), ("llm/decay", False, 1e-2, 1e-2, 1), ("llm/no_decay", False, 1e-2, 1e-2, 4)]


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        tokens = torch.randint(20, (4,), generator=g)
        h = model.projector(x) + model.language_model.embed(tokens)
        loss = model.language_model.head(model.language_model.norm(model.language_model.mlp(h))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_combined_optimizer_sets_lr_through_param_groups_and_resumes_exactly() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer("muon", model, _groups(model), (0.9, 0.95), 1e-8, fused=False)
    assert isinstance(opt, MuonWithAdamW) and len(opt.param_groups) == 3
    for g in opt.param_groups:  # what the training loop's schedule does every step
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _train(opt, model, 1, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0 reached both halves

    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    _train(opt, model, 3, seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    _train(opt, model, 3, seed=3)
    continuous = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(state)
    again = build_optimizer("muon", model, _groups(model), (0.9, 0.95), 1e-8, fused=False)
    again.load_state_dict(saved)
    _train(again, model, 3, seed=3)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(continuous, model.parameters()))


def test_combined_optimizer_runs_step_hooks() -> None:
    """Step hooks (what LR schedulers and profilers attach) fire around the combined step."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer("muon", model, _groups(model), (0.9, 0.95), 1e-8, fused=False)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    _train(opt, model, 2, seed=1)
    assert calls == ["pre", "post"] * 2
    handle.remove()
    _train(opt, model, 1, seed=2)
    assert calls == ["pre", "post"] * 2 + ["pre"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    _train(opt, model, 1, seed=3)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5 * opt.param_groups[0]["initial_lr"]


def test_unknown_optimizer_is_named() -> None:
    model = TinyLM()
    with pytest.raises(VituneError, match="adamw, muon"):
        build_optimizer("sgd", model, _groups(model), (0.9, 0.95), 1e-8, fused=False)
