"""The decoder's last layer computed only where the loss is taken.

The loss reads the final hidden state at the positions that predict a label, and nothing else
reads the last layer's output. Its keys and values are needed at every position (each label
position attends to all earlier ones), but its queries, attention output, o-projection, MLP and
the final norm only at the label positions. The head at label positions (`TrainingModule`) is
the same argument one step later. For an L-layer LM this removes ~(1 - label share) x 0.8 / L of
the decoder's linear work: a few percent for a 32-layer LLM, a quarter of a step for the
2-layer LMs of the synthetic world and the `wide` benchmark, where most tokens carry no label.

Exact (the same numbers up to float rounding), for the decoder layers whose structure this file
knows: Llama, Mistral and Qwen2 (`input_layernorm`, `self_attn` with q/k/v/o projections and
`head_dim`/`scaling`, `post_attention_layernorm`, `mlp`; rotary embeddings from the decoder's
`rotary_emb`). Anything else, and sliding windows shorter than the batch, attention dropout or
gradient checkpointing, takes the plain decoder forward (`supported` says which).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


def supported(decoder: nn.Module, length: int) -> bool:
    """Whether `decoder_at_labels` computes exactly what `decoder(...)` does for batches of
    `length` tokens."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "norm"):
        return False
    if any(type(layer).__name__ not in LAYERS for layer in layers):
        return False
    cfg = decoder.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and window < length:
        return False
    if getattr(cfg, "attention_dropout", 0.0) and decoder.training:
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if getattr(decoder, "gradient_checkpointing", False) or any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        return False
    attn = layers[-1].self_attn
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) and not (
        hasattr(attn, "q_norm") or hasattr(attn, "k_norm"))


def label_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From `keep` ([batch, T-1], True where position t predicts a label): `positions` [batch, Q],
    each row's label positions in order, padded with 0 to the longest row's count Q; and `flat`
    [N], where `keep`'s N positions (row-major, as `hidden[:, :-1][keep]` orders them) sit in
    `positions` flattened. Computed outside any compiled graph (their sizes depend on values)."""
    batch = keep.shape[0]
    counts = keep.sum(1)
    q = max(1, int(counts.max()))
    rows, cols = keep.nonzero(as_tuple=True)
    slot = (keep.long().cumsum(1) - 1)[rows, cols]
    positions = torch.zeros(batch, q, dtype=torch.long, device=keep.device)
    positions[rows, slot] = cols
    return positions, rows * q + slot


def _rope(attn: nn.Module) -> Any:
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def decoder_at_labels(decoder: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      positions: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the decoder's norm) at the label positions, [N, hidden], in
    `flat`'s order (see `label_slots`): what `decoder(inputs_embeds=embeds, attention_mask=...)
    .last_hidden_state[:, :-1][keep]` returns, with the last layer run at those positions only."""
    batch, length, _ = embeds.shape
    device = embeds.device
    position_ids = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    cos, sin = decoder.rotary_emb(embeds, position_ids)
    keys = torch.arange(length, device=device)
    real = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    # Right-padded rows: a key is visible when it is real and not after the query.
    mask = ((keys[None, :, None] >= keys[None, None, :]) & real[:, None, :])[:, None]
    if getattr(decoder.config, "_attn_implementation", "sdpa") == "eager":  # eager attention adds its mask
        mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=device).masked_fill(~mask, torch.finfo(embeds.dtype).min)
    hidden = embeds
    for layer in decoder.layers[:-1]:
        out = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out

    last = decoder.layers[-1]
    attn = last.self_attn
    rows = torch.arange(batch, device=device)[:, None]
    x = last.input_layernorm(hidden)
    hd = attn.head_dim
    q = attn.q_proj(x[rows, positions]).view(batch, positions.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, -1, hd).transpose(1, 2)
    rope = _rope(attn)
    q = rope(q, q, cos[rows, positions], sin[rows, positions])[0]
    k = rope(k, k, cos, sin)[0]
    # Each label query sees the real keys up to its own position; the padding slots (position
    # 0) see the first token, so no row is empty.
    visible = (keys[None, None, :] <= positions[:, :, None]) & real[:, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=attn.scaling,
                                       enable_gqa=k.shape[1] != q.shape[1])
    o = attn.o_proj(o.transpose(1, 2).reshape(batch, positions.shape[1], -1))
    h = hidden[rows, positions] + o
    h = h + last.mlp(last.post_attention_layernorm(h))
    return decoder.norm(h).reshape(-1, h.shape[-1])[flat]
