"""GPT-2 (``GPT2LMHeadModel``): learned positions, pre-LN blocks, fused c_attn, tied head."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ModelShape, causal_attention, concat_cache


class GPT2Adapter(FamilyAdapter):
    family = "gpt2"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.tr = model.transformer
        c = model.config
        self._shape = ModelShape("gpt2", c.n_layer, c.n_embd, c.n_head, c.n_head, c.n_embd // c.n_head,
                                 c.vocab_size, c.n_positions, causal=True)

    def embed(self, input_ids, position_ids):
        return self.tr.wte(input_ids) + self.tr.wpe(position_ids)  # (B, T, C)

    def block(self, i, hidden, past_key, past_value, position_ids, attention_mask=None):
        blk, s = self.tr.h[i], self._shape
        b, t, c = hidden.shape
        q, k, v = blk.attn.c_attn(blk.ln_1(hidden)).split(c, dim=2)  # 3 x (B, T, C)
        q, k, v = (x.view(b, t, s.num_heads, s.head_dim).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        k, v = concat_cache(past_key, k), concat_cache(past_value, v)
        scale = 1.0
        if blk.attn.scale_attn_weights:
            scale /= s.head_dim ** 0.5
        if getattr(blk.attn, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        y = causal_attention(q, k, v, attention_mask, scale).transpose(1, 2).reshape(b, t, c)
        hidden = hidden + blk.attn.c_proj(y)
        hidden = hidden + blk.mlp(blk.ln_2(hidden))
        return hidden, k, v

    def head(self, hidden, attention_mask=None):
        return self.model.lm_head(self.tr.ln_f(hidden))  # (B, T, V)
