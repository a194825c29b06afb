"""BERT-style encoders (BERT, MiniLM sentence encoders): post-LN blocks, no KV cache.

The "head" is the pooled sentence embedding: masked mean over tokens, L2-normalised (the
sentence-transformers recipe of all-MiniLM-L6-v2). Blocks see the whole sequence at once, so
an encoder split sends every token's hidden state once and gets one embedding back.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ModelShape


class BertAdapter(FamilyAdapter):
    family = "bert"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = getattr(model, "bert", model)  # BertModel or a task model wrapping one
        c = model.config
        self._shape = ModelShape("bert", c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                 c.num_attention_heads, c.hidden_size // c.num_attention_heads,
                                 c.vocab_size, c.max_position_embeddings, causal=False)

    def embed(self, input_ids, position_ids):
        emb = self.core.embeddings
        h = emb.word_embeddings(input_ids) + emb.position_embeddings(position_ids)
        h = h + emb.token_type_embeddings(torch.zeros_like(input_ids))
        return emb.LayerNorm(h)  # (B, T, C)

    def block(self, i, hidden, past_key, past_value, position_ids, attention_mask=None):
        layer, s = self.core.encoder.layer[i], self._shape
        sa = layer.attention.self
        b, t, c = hidden.shape
        q, k, v = (m(hidden).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
                   for m in (sa.query, sa.key, sa.value))  # (B, H, T, D)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             scale=s.head_dim ** -0.5)
        y = y.transpose(1, 2).reshape(b, t, c)
        hidden = layer.attention.output.LayerNorm(layer.attention.output.dense(y) + hidden)
        inter = layer.intermediate(hidden)
        hidden = layer.output.LayerNorm(layer.output.dense(inter) + hidden)
        return hidden, None, None

    def head(self, hidden, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)
