"""Optimizers by name (`optim.name`): AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al., 2024; "Muon is Scalable for LLM Training", Liu et al., 2025) replaces each
hidden weight matrix's momentum update by its nearest semi-orthogonal matrix (a few Newton-Schulz
iterations), so every direction of the update moves at the same rate and the weak ones are not
drowned by the strong. Embeddings, the output head, norms and biases stay with AdamW, as in the
references. Updates are scaled to AdamW's RMS (0.2 x sqrt(max(rows, cols)), the Moonlight rule),
so a part's learning rate means the same with either optimizer.

`torch.optim.Muon` orthogonalises in bfloat16, which CPUs without bf16 matrix units run ~400x
slower than float32; `Muon` here runs the same iteration in float32 on the CPU and in bfloat16 on
accelerators, and shares one set of parameter groups with the AdamW beside it, so the training
loop's schedule sets both through `param_groups`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vitune.errors import VituneError

OPTIMIZERS = ("adamw", "muon")
# The quintic Newton-Schulz coefficients of the reference implementation (fast, not exact: the
# singular values land in about [0.7, 1.2], which trains as well as the exact polar factor).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of `update` = U S V^T (2-D), by `steps` Newton-Schulz iterations."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(torch.float32 if update.device.type == "cpu" else torch.bfloat16)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's range
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised per matrix, scaled to AdamW's update RMS; decoupled weight decay."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise VituneError(f"Muon updates 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - beta)
                update = orthogonalize(p.grad.lerp(buf, beta), group["ns_steps"])  # Nesterov
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked `muon`, AdamW for the others, as one optimizer: `param_groups`
    lists both halves' groups (the same dicts), so setting a group's lr reaches the half that owns it."""

    def __init__(self, groups: list[dict[str, Any]], momentum: float, adamw_kwargs: dict[str, Any]) -> None:
        muon = [g for g in groups if g.get("muon")]
        adamw = [g for g in groups if not g.get("muon")]
        self.muon = Muon(muon, lr=muon[0]["lr"], momentum=momentum) if muon else None
        self.adamw = torch.optim.AdamW(adamw, lr=adamw[0]["lr"], **adamw_kwargs) if adamw else None
        self.halves = [o for o in (self.muon, self.adamw) if o is not None]
        # Not Optimizer.__init__ (the halves own the groups and the state), but its step-hook set-up:
        # register_step_pre/post_hook work and step() runs them (via _patch_step_function). No
        # state-dict hook tables: state_dict() below would not run them, so registering one fails.
        self.defaults = {}
        self.param_groups = [g for o in self.halves for g in o.param_groups]
        self._optimizer_step_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._patch_step_function()

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        return {p: s for o in self.halves for p, s in o.state.items()}

    def step(self, closure: Any = None) -> None:
        for o in self.halves:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.halves:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict() if self.muon else None, "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, half in (("muon", self.muon), ("adamw", self.adamw)):
            if (half is None) != (state_dict.get(name) is None):
                raise VituneError(f"optimizer state: the checkpoint's {name} half does not match this run's parameter groups")
            if half is not None:
                half.load_state_dict(state_dict[name])


def muon_matrices(model: nn.Module) -> set[int]:
    """ids of the weights Muon should update: 2-D weights of linear layers, not the output head
    (a classifier over the vocabulary, which the references leave to AdamW like the embeddings)."""
    head = None
    lm = getattr(model, "language_model", None)
    if lm is None:  # a bare causal LM (the world's LM pretraining), not a LLaVA model
        lm = model
    if hasattr(lm, "get_output_embeddings"):
        out = lm.get_output_embeddings()
        head = None if out is None else id(out.weight)
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m.weight.ndim == 2 and id(m.weight) != head}


def split_muon_groups(groups: list[dict[str, Any]], matrices: set[int], lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Each parameter group split in two: its Muon matrices (marked `muon`, named PART.muon/..., their
    learning rates times `lr_scale`) and the rest."""
    out = []
    for g in groups:
        mats = [p for p in g["params"] if id(p) in matrices]
        rest = [p for p in g["params"] if id(p) not in matrices]
        if mats:
            part, _, kind = g["name"].partition("/")
            out.append({**g, "params": mats, "muon": True, "name": f"{part}.muon/{kind}",
                        "lr": g["lr"] * lr_scale, "base_lr": g["base_lr"] * lr_scale})
        if rest:
            out.append({**g, "params": rest})
    return out


def build_optimizer(name: str, model: nn.Module, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float,
                    fused: bool, muon_momentum: float = 0.95, muon_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The run's optimizer over `groups` (`param_groups`' output): `adamw`, or `muon` (see the module doc)."""
    adamw_kwargs: dict[str, Any] = {"betas": betas, "eps": eps, **({"fused": True} if fused else {"foreach": True})}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], **adamw_kwargs)
    if name == "muon":
        return MuonWithAdamW(split_muon_groups(groups, muon_matrices(model), muon_lr_scale), muon_momentum, adamw_kwargs)
    raise VituneError(f"optim.name: unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
