"""`FastLM`'s one-token decode step compiled ahead of time with AOTInductor, for small models.

A small model's decode step is bound by the number of tensor ops, not by arithmetic or memory:
the synthetic world's LM runs ~80 ops per token from Python at a few microseconds each. Compiled
for one batch size and one cache length into a C++ library (`torch.export` + AOTInductor), the
step is one call with its element-wise ops fused: half the time per token here (docs in
bench/README.md). Opt-in (`Decoder(compile_step=True)`, `vitune generate/chat --compile-decode`),
since each new shape costs a compile (~25 s on 2 cores) before its first token.

Static shapes: the whole cache is attended, `valid` masking the columns not yet written (the
cache starts zeroed, since a masked NaN would still poison the weighted sum), and the new
token's keys and values go to column `slot` in place. Weights are inputs, not constants baked
into the library, so one library serves every model of the same shape and never goes stale when
a model trains between generations. Libraries are cached on disk (`VITUNE_CACHE_DIR`, default
~/.cache/vitune, under `aoti/`), keyed by the shapes, dtypes, device, torch version, CPU ISA (native code) and the step's source, and
written under a temporary name then renamed, so a crash never leaves half a library.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitune.model.fast_lm import FastLM, rms_norm, rotate

log = logging.getLogger(__name__)
CACHE_LENGTH_STEP = 64  # cache lengths round up to this, so nearby prompt lengths share a library


def cache_dir() -> Path:
    return Path(os.environ.get("VITUNE_CACHE_DIR", Path.home() / ".cache" / "vitune")) / "aoti"


def cache_length(max_len: int) -> int:
    return -(-max_len // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP


@dataclass(frozen=True)
class StepSpec:
    """What the traced step's code depends on besides its inputs' shapes."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    eps: tuple[float, ...]  # ln1, ln2 of each layer, then the final norm
    biases: tuple[bool, ...]  # head, then qkv / o / gate_up / down of each layer

    @classmethod
    def of(cls, fl: FastLM) -> StepSpec:
        eps = tuple(e for w in fl.layers for e in (w.eps1, w.eps2)) + (fl.norm_eps,)
        biases = (fl.head_b is not None,) + tuple(b is not None for w in fl.layers for b in (w.qkv_b, w.ob, w.gate_up_b, w.down_b))
        return cls(len(fl.layers), fl.heads, fl.kv_heads, fl.head_dim, fl.scale, eps, biases)


def supports(fl: FastLM) -> bool:
    """Fused layers (the small models whose steps are op-bound), SiLU MLPs, a fixed rotary table."""
    return fl.rope_table and all(w.qkv is not None and w.gate_up is not None and w.act is F.silu for w in fl.layers)


def weights(fl: FastLM) -> list[torch.Tensor]:
    """The step's weight inputs in `StepGraph`'s order (biases only where the model has them)."""
    out = [fl.embed, fl.cos, fl.sin, fl.norm, fl.head] + ([fl.head_b] if fl.head_b is not None else [])
    for w in fl.layers:
        for t in (w.ln1, w.ln2, w.qkv, w.qkv_b, w.o, w.ob, w.gate_up, w.gate_up_b, w.down, w.down_b):
            if t is not None:
                out.append(t)
    return out


class StepGraph(nn.Module):
    """The step as a pure function of its inputs (what `torch.export` traces): tokens [B],
    positions [B, 1], slot [1] (the cache column to write), valid [B, L] (columns to attend, the
    slot included), the weights, then the layers' key and value caches [B, kv_heads, L, D]."""

    def __init__(self, spec: StepSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
                weights: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
        s = self.spec
        it = iter(weights)
        has_bias = iter(s.biases)
        eps = iter(s.eps)
        embed, cos, sin, norm, head = (next(it) for _ in range(5))
        head_b = next(it) if next(has_bias) else None
        b = tokens.shape[0]
        nq, nkv, d = s.heads, s.kv_heads, s.head_dim
        hidden = F.embedding(tokens.view(-1, 1), embed)
        cos, sin = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
        mask = valid[:, None, None, :]
        for i in range(s.layers):
            ln1, ln2, qkv_w = next(it), next(it), next(it)
            qkv_b = next(it) if next(has_bias) else None
            o_w = next(it)
            o_b = next(it) if next(has_bias) else None
            gate_up_w = next(it)
            gate_up_b = next(it) if next(has_bias) else None
            down_w = next(it)
            down_b = next(it) if next(has_bias) else None
            eps1, eps2 = next(eps), next(eps)
            x = rms_norm(hidden, ln1, eps1)
            qkv = F.linear(x, qkv_w, qkv_b).view(b, 1, nq + 2 * nkv, d)
            qk, val = rotate(qkv[:, :, : nq + nkv], cos, sin), qkv[:, :, nq + nkv :]
            k[i].index_copy_(2, slot, qk[:, :, nq:].transpose(1, 2))
            v[i].index_copy_(2, slot, val.transpose(1, 2))
            out = F.scaled_dot_product_attention(qk[:, :, :nq].transpose(1, 2), k[i], v[i], attn_mask=mask, scale=s.scale,
                                                 enable_gqa=nq != nkv)
            hidden = hidden + F.linear(out.transpose(1, 2).reshape(b, 1, nq * d), o_w, o_b)
            x = rms_norm(hidden, ln2, eps2)
            gate, up = F.linear(x, gate_up_w, gate_up_b).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, down_w, down_b)
        h = rms_norm(hidden, norm, next(eps))
        return F.linear(h, head, head_b)[:, -1]


def _inputs(fl: FastLM, ws: list[torch.Tensor]) -> tuple:
    dev = fl.embed.device
    b, length = fl.valid.shape
    return (torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, 1, dtype=torch.long, device=dev),
            torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(b, length, dtype=torch.bool, device=dev), ws,
            [torch.zeros_like(c) for c in fl.k], [torch.zeros_like(c) for c in fl.v])  # never the live caches


@functools.cache
def _step_source() -> str:
    """The step's own code, read once per process (every FastLM that compiles asks for a key)."""
    return "".join(inspect.getsource(f) for f in (StepGraph, rotate, rms_norm))


def _key(spec: StepSpec, args: tuple) -> str:
    leaves = [*args[:4], *args[4], *args[5], *args[6]]
    shapes = [(tuple(t.shape), str(t.dtype)) for t in leaves]
    # The CPU's vector ISA too: the library is native code, and a home directory may be shared by
    # machines. And the step's own code, so an edited step never loads a library of the old one.
    text = json.dumps({"spec": asdict(spec), "shapes": shapes, "device": str(args[0].device), "torch": torch.__version__,
                       "cpu": [platform.machine(), torch.backends.cpu.get_cpu_capability()], "code": _step_source()})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_step(fl: FastLM) -> Callable[..., torch.Tensor]:
    """The compiled step for `fl`'s model shape, batch and cache length: from the disk cache, or
    compiled now (and cached). Raises whatever torch.export or the compiler raises."""
    spec = StepSpec.of(fl)
    ws = weights(fl)
    args = _inputs(fl, ws)
    path = cache_dir() / f"step-{_key(spec, args)}.pt2"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        b, length = fl.valid.shape
        log.warning("compiling the decode step for batch %d, cache length %d (once per shape; cached in %s)", b, length, path.parent)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own pickling of its pytree specs
            program = torch.export.export(StepGraph(spec), args)
            tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.pt2")
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    runner = torch._inductor.aoti_load_package(str(path))

    def step(tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return runner(tokens, positions, slot, fl.valid, ws, fl.k, fl.v)

    return step
