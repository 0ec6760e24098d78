"""A lean KV-cached forward for Llama-family LLMs (Llama/Vicuna, Mistral, Qwen2), for decoding.

transformers' forward is general (cache classes, mask builders, attention dispatch, output
objects); at decode time, one token per row, that generality costs more than the arithmetic of a
small model. This runs the same weights in a straight line: a preallocated KV cache, the rotary
cos/sin computed once for every position of the batch, weights read straight from the modules
(no module calls), the rotation of queries and keys done together in three tensor ops, one SDPA
call per layer, no attention mask at all when no row is padded, and decode-step matrix products
by whichever CPU kernel this machine runs faster for so few rows (`kernels`). The numbers are
those of the transformers model (tested to 1e-4); models of any other shape fall back to
transformers' forward in the decoder.

Large models use their weights in place. Small ones (decoder layers up to `FUSE_BYTES`), whose
decoding is bound by the number of tensor ops rather than by reading weights, get fused QKV and
gate/up matrices, copied per batch (a few milliseconds at most, and never stale when the model
trains between two generations): 4 matrix products per layer instead of 7. Their steps can also
run compiled ahead of time (`compiled=True`, `compiled_step`): one call per token instead of ~80.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitune.model.kernels import linear_for

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2")
# Rotary types whose frequencies depend on the sequence length seen so far: computed per step.
_DYNAMIC_ROPE = ("dynamic", "longrope")
FUSE_BYTES = 32 * 2**20


def supports(lm: nn.Module) -> bool:
    cfg = lm.config
    if cfg.model_type not in SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False  # a sliding window changes the mask: leave it to transformers
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(lm, "lm_head"):
        return False
    # Weights are read straight from plain Linear layers: a LoRA-wrapped or quantized projection
    # (whose `.weight` is not the whole story) takes transformers' forward instead.
    linears = [lm.lm_head] + [getattr(part, name) for layer in inner.layers
                              for part, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj")))
                              for name in names]
    return all(type(m) is nn.Linear for m in linears) and type(inner.embed_tokens) is nn.Embedding


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's tensors, read once so the step makes no module calls."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    eps1: float
    eps2: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qb: torch.Tensor | None
    kb: torch.Tensor | None
    vb: torch.Tensor | None
    o: torch.Tensor
    ob: torch.Tensor | None
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_b: torch.Tensor | None
    up_b: torch.Tensor | None
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    qkv: torch.Tensor | None = None  # fused [q; k; v] (small models)
    qkv_b: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None  # fused [gate; up]
    gate_up_b: torch.Tensor | None = None

    def products(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The (weight, bias) pairs `_forward` multiplies by, fused where this layer is."""
        qkv = [(self.qkv, self.qkv_b)] if self.qkv is not None else [(self.q, self.qb), (self.k, self.kb), (self.v, self.vb)]
        gate_up = [(self.gate_up, self.gate_up_b)] if self.gate_up is not None else [(self.gate, self.gate_b), (self.up, self.up_b)]
        return [*qkv, (self.o, self.ob), *gate_up, (self.down, self.down_b)]


def _cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]


def _layer(layer: nn.Module, hidden_act: str, fuse: bool) -> _Layer:
    a, m = layer.self_attn, layer.mlp
    if fuse:
        w = _layer(layer, hidden_act, fuse=False)
        qkv_b = None if (w.qb, w.kb, w.vb) == (None, None, None) else _cat(*(
            b if b is not None else t.new_zeros(t.shape[0]) for b, t in ((w.qb, w.q), (w.kb, w.k), (w.vb, w.v))))
        gate_up_b = None if (w.gate_b, w.up_b) == (None, None) else _cat(*(
            b if b is not None else t.new_zeros(t.shape[0]) for b, t in ((w.gate_b, w.gate), (w.up_b, w.up))))
        return dataclasses.replace(w, qkv=torch.cat((w.q, w.k, w.v)), qkv_b=qkv_b, gate_up=torch.cat((w.gate, w.up)),
                                   gate_up_b=gate_up_b)
    return _Layer(
        layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
        float(layer.input_layernorm.variance_epsilon), float(layer.post_attention_layernorm.variance_epsilon),
        a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
        a.o_proj.weight, a.o_proj.bias,
        m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, m.gate_proj.bias, m.up_proj.bias, m.down_proj.bias,
        F.silu if hidden_act in ("silu", "swish") else m.act_fn,
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    if x.dtype == torch.float32:  # one op instead of six; bit-identical in our checks
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, for x [B, T, heads, D] (queries and keys together) and the
    signed sin of `FastLM._signed`."""
    d = x.shape[-1]
    flipped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, flipped, sin)


def _mlp_block(w: _Layer, hidden: torch.Tensor, mm: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The layer's second half: `hidden` plus its MLP of the post-attention norm."""
    x = rms_norm(hidden, w.ln2, w.eps2)
    if w.gate_up is not None:
        gate, up = mm(x, w.gate_up, w.gate_up_b).chunk(2, dim=-1)
    else:
        gate, up = mm(x, w.gate, w.gate_b), mm(x, w.up, w.up_b)
    return hidden + mm(w.act(gate) * up, w.down, w.down_b)


class FastLM:
    """Owns one batch's KV cache. `prefill` then repeated `step`; `select_rows` drops finished rows."""

    def __init__(self, lm: nn.Module, batch: int, max_len: int, compiled: bool = False) -> None:
        self.lm = lm
        self.inner = lm.model
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.gqa = self.kv_heads != self.heads
        layer_bytes = sum(p.numel() * p.element_size() for p in self.inner.layers.parameters())
        fuse = layer_bytes <= FUSE_BYTES
        self.layers = [_layer(layer, str(getattr(cfg, "hidden_act", "")), fuse) for layer in self.inner.layers]
        self.embed = self.inner.embed_tokens.weight
        self.norm = self.inner.norm.weight
        self.norm_eps = float(self.inner.norm.variance_epsilon)
        self.head = lm.lm_head.weight
        self.head_b = lm.lm_head.bias
        self._weights = [(self.head, self.head_b)] + [pair for w in self.layers for pair in w.products()]
        self._kernels: dict[int, Callable[..., torch.Tensor]] = {}
        rotary = self.inner.rotary_emb
        self.rope_table = getattr(rotary, "rope_type", "default") not in _DYNAMIC_ROPE
        # compiled: decode steps by `compiled_step`, where the model is one it handles (small,
        # op-bound); then the cache length is rounded up to a shared size and the cache zeroed
        # (its unwritten columns are read, masked). False again once the steps run eagerly.
        self.compiled = False
        self._compiled_step: Callable[..., torch.Tensor] | None = None
        if compiled:
            from vitune.model import compiled_step  # it imports this module

            self.compiled = compiled_step.supports(self)
            if self.compiled:
                max_len = compiled_step.cache_length(max_len)
        p = self.embed
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        alloc = torch.zeros if self.compiled else torch.empty
        self.k = [alloc(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v = [alloc(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=p.device)  # key columns that are real tokens
        self.padded = False  # no row has padding: attention needs no mask
        self.length = 0
        if self.rope_table:
            positions = torch.arange(max_len, device=p.device)[None]
            cos, sin = rotary(torch.empty(0, dtype=p.dtype, device=p.device), positions)
            self.cos, self.sin = cos[0], self._signed(sin[0])

    @staticmethod
    def _signed(sin: torch.Tensor) -> torch.Tensor:
        """sin with its first half negated: rotate_half(x) * sin == flip_halves(x) * signed_sin."""
        half = sin.shape[-1] // 2
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [B, T, 1, D] for positions [B, T]."""
        if self.rope_table:
            cos, sin = self.cos[positions], self.sin[positions]
        else:
            cos, sin = self.inner.rotary_emb(torch.empty(0, dtype=dtype, device=positions.device), positions)
            sin = self._signed(sin)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, _ = hidden.shape
        start, end = self.length, self.length + t
        cos, sin = self._rope(positions, hidden.dtype)
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        mm = self._linear(b * t)
        last = len(self.layers) - 1
        for i, w in enumerate(self.layers):
            x = rms_norm(hidden, w.ln1, w.eps1)
            if i == last and t > 1:
                return self._last_layer_at_end(w, x, hidden, cos, sin, attn_mask)
            if w.qkv is not None:
                qkv = mm(x, w.qkv, w.qkv_b).view(b, t, nq + 2 * nkv, d)
                qk, v = rotate(qkv[:, :, : nq + nkv], cos, sin), qkv[:, :, nq + nkv :]
            else:
                q = mm(x, w.q, w.qb).view(b, t, nq, d)
                k = mm(x, w.k, w.kb).view(b, t, nkv, d)
                qk = rotate(torch.cat((q, k), dim=2), cos, sin)
                v = mm(x, w.v, w.vb).view(b, t, nkv, d)
            self.k[i][:, :, start:end] = qk[:, :, nq:].transpose(1, 2)
            self.v[i][:, :, start:end] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qk[:, :, :nq].transpose(1, 2), self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=attn_mask,
                is_causal=causal, scale=self.scale, enable_gqa=self.gqa,
            )  # fmt: skip
            hidden = _mlp_block(w, hidden + mm(out.transpose(1, 2).reshape(b, t, nq * d), w.o, w.ob), mm)
        self.length = end
        return rms_norm(hidden[:, -1:], self.norm, self.norm_eps)

    def _last_layer_at_end(self, w: _Layer, x: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           attn_mask: torch.Tensor | None) -> torch.Tensor:
        """A prefill's last layer, given its normed input `x` [B, T, H]: keys and values at every
        position (later steps attend to them), the rest at the last position only, the one whose
        output is read. The same numbers; for the 2-layer `wide` benchmark LM ~40 % of the
        prefill's decoder work (the trainer's `label_positions` makes the same cut)."""
        b, t, _ = x.shape
        start, end = self.length, self.length + t
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        mm, mm1 = self._linear(b * t), self._linear(b)
        if w.qkv is not None:
            split = nq * d
            wq, bq = w.qkv[:split], None if w.qkv_b is None else w.qkv_b[:split]
            kv = mm(x, w.qkv[split:], None if w.qkv_b is None else w.qkv_b[split:]).view(b, t, 2 * nkv, d)
            k, v = kv[:, :, :nkv], kv[:, :, nkv:]
        else:
            wq, bq = w.q, w.qb
            k, v = mm(x, w.k, w.kb).view(b, t, nkv, d), mm(x, w.v, w.vb).view(b, t, nkv, d)
        q = rotate(mm1(x[:, -1:], wq, bq).view(b, 1, nq, d), cos[:, -1:], sin[:, -1:])
        self.k[-1][:, :, start:end] = rotate(k, cos, sin).transpose(1, 2)
        self.v[-1][:, :, start:end] = v.transpose(1, 2)
        # One query per row, the last: it sees every real key, so no causal mask (SDPA's would
        # align a lone query with the first key).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.k[-1][:, :, :end], self.v[-1][:, :, :end],
            attn_mask=None if attn_mask is None else attn_mask[:, :, -1:], scale=self.scale, enable_gqa=self.gqa,
        )  # fmt: skip
        h = _mlp_block(w, hidden[:, -1:] + mm1(out.transpose(1, 2).reshape(b, 1, nq * d), w.o, w.ob), mm1)
        self.length = end
        return rms_norm(h, self.norm, self.norm_eps)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden.shape[0] * hidden.shape[1])(hidden, self.head, self.head_b)[:, -1].float()

    def _linear(self, rows: int) -> Callable[..., torch.Tensor]:
        """The matrix-product kernel for this many rows (`kernels.linear_for`), chosen once per count."""
        fn = self._kernels.get(rows)
        if fn is None:
            fn = self._kernels[rows] = linear_for(rows, self._weights, self.embed.dtype)
        return fn

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Left-padded prompt embeddings [B, T, H] with mask [B, T] -> last-position logits [B, V]."""
        b, t, _ = embeds.shape
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.valid[:, :t] = mask.bool()
        self.padded = not bool(self.valid[:, :t].all())
        self.next_pos = positions[:, -1] + 1
        if not self.padded:
            return self._logits(self._forward(embeds, positions, None, causal=t > 1))
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        attn_mask = causal[None] & self.valid[:, None, :t]
        # Padding queries would see no key at all (NaN); let them see themselves. They are never read.
        attn_mask = attn_mask | torch.eye(t, dtype=torch.bool, device=embeds.device)[None]
        return self._logits(self._forward(embeds, positions, attn_mask.unsqueeze(1), causal=False))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row [B] -> logits [B, V]."""
        if self.compiled and self._load_compiled():
            self.valid[:, self.length] = True
            slot = torch.full((1,), self.length, dtype=torch.long, device=tokens.device)
            logits = self._compiled_step(tokens.reshape(-1), self.next_pos.view(-1, 1), slot)  # type: ignore[misc]
            self.next_pos = self.next_pos + 1
            self.length += 1
            return logits.float()
        hidden = F.embedding(tokens.view(-1, 1), self.embed)
        self.valid[:, self.length] = True
        attn_mask = self.valid[:, None, None, : self.length + 1] if self.padded else None
        positions = self.next_pos.view(-1, 1)
        self.next_pos = self.next_pos + 1
        return self._logits(self._forward(hidden, positions, attn_mask, causal=False))

    def _load_compiled(self) -> bool:
        """The compiled step, loaded (or compiled) at the first step; where compiling fails (no
        C++ compiler, say), the eager step from then on."""
        if self._compiled_step is None:
            from vitune.model import compiled_step

            try:
                self._compiled_step = compiled_step.load_step(self)
            except Exception as err:  # noqa: BLE001 - any compiler failure: decode eagerly, never fail the request
                log.warning("the compiled decode step is not available (%s: %s); decoding eagerly", type(err).__name__, err)
                self.compiled = False
                return False
        return True

    def select(self, rows: torch.Tensor) -> None:
        # A smaller batch is another shape: its steps run eagerly (the cache layout is the same).
        self.compiled, self._compiled_step = False, None
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid = self.valid.index_select(0, rows)
        self.padded = not bool(self.valid[:, : self.length].all())

    def select_rows(self, rows: torch.Tensor) -> None:
        self.select(rows)
        self.next_pos = self.next_pos.index_select(0, rows)
