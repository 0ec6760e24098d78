"""A lean KV-cached forward for Llama-family LLMs (Llama/Vicuna, Mistral, Qwen2), for decoding.

transformers' forward is general (cache classes, mask builders, attention dispatch, output
objects); at decode time, one token per row, that generality costs more than the arithmetic of a
small model. This runs the same modules' weights in a straight line with a preallocated KV cache
and one SDPA call per layer, so per-token Python overhead is a few dozen tensor ops. The numbers
are those of the transformers model (tested to 1e-4); models of any other shape fall back to
transformers' forward in the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2")


def supports(lm: nn.Module) -> bool:
    cfg = lm.config
    if cfg.model_type not in SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False  # a sliding window changes the mask: leave it to transformers
    inner = getattr(lm, "model", None)
    return inner is not None and hasattr(inner, "rotary_emb") and hasattr(lm, "lm_head")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


class FastLM:
    """Owns one batch's KV cache. `prefill` then repeated `step`; `select` drops finished rows."""

    def __init__(self, lm: nn.Module, batch: int, max_len: int) -> None:
        self.lm = lm
        self.inner = lm.model
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        p = next(lm.parameters())
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.inner.layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.inner.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=p.device)  # key columns that are real tokens
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid = self.valid.index_select(0, rows)

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = hidden.shape
        start, end = self.length, self.length + t
        cos, sin = self.inner.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = _rms(hidden, layer.input_layernorm)
            q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=attn_mask, scale=self.scale,
                enable_gqa=self.kv_heads != self.heads,
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
            x = _rms(hidden, layer.post_attention_layernorm)
            mlp = layer.mlp
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.length = end
        return _rms(hidden[:, -1:], self.inner.norm)

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Left-padded prompt embeddings [B, T, H] with mask [B, T] -> last-position logits [B, V]."""
        b, t, _ = embeds.shape
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.valid[:, :t] = mask.bool()
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        attn_mask = causal[None] & self.valid[:, None, :t]
        # Padding queries would see no key at all (NaN); let them see themselves. They are never read.
        attn_mask = attn_mask | torch.eye(t, dtype=torch.bool, device=embeds.device)[None]
        self.next_pos = positions[:, -1] + 1
        return self.lm.lm_head(self._forward(embeds, positions, attn_mask.unsqueeze(1)))[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row [B] -> logits [B, V]."""
        hidden = self.inner.embed_tokens(tokens.view(-1, 1))
        self.valid[:, self.length] = True
        attn_mask = self.valid[:, None, None, : self.length + 1]
        positions = self.next_pos.view(-1, 1)
        self.next_pos = self.next_pos + 1
        return self.lm.lm_head(self._forward(hidden, positions, attn_mask))[:, -1].float()

    def select_rows(self, rows: torch.Tensor) -> None:
        self.select(rows)
        self.next_pos = self.next_pos.index_select(0, rows)
