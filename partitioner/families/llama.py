"""Llama family (Llama, Qwen2, Mistral): RMSNorm, rotary positions, grouped-query attention.

q/k/v biases (Qwen2) live in the projection modules themselves. Rotary variants (rope scaling)
come from the model's own rotary module, so every variant the checkpoint's config names works.
Mistral's sliding window is not applied: contexts beyond ``sliding_window`` are refused.
The edge's block graphs are written directly around ONNX Runtime's fused attention (``llama_onnx.py``).
"""

from __future__ import annotations

import logging

import torch

from .base import FamilyAdapter, ModelShape, causal_attention, concat_cache

log = logging.getLogger("seamline.partitioner.families.llama")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAdapter(FamilyAdapter):
    family = "llama"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        max_pos = c.max_position_embeddings
        window = getattr(c, "sliding_window", None)
        if window and getattr(c, "use_sliding_window", True):
            max_pos = min(max_pos, window)
        self._shape = ModelShape("llama", c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                 c.num_key_value_heads or c.num_attention_heads, head_dim, c.vocab_size,
                                 max_pos, causal=True)

    def embed(self, input_ids, position_ids):
        return self.core.embed_tokens(input_ids)  # (B, T, C); positions enter through rotary

    def block(self, i, hidden, past_key, past_value, position_ids, attention_mask=None):
        layer, s = self.core.layers[i], self._shape
        attn = layer.self_attn
        b, t, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self.core.rotary_emb(v, position_ids)  # (B, T, D)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = concat_cache(past_key, k), concat_cache(past_value, v)
        rep = s.num_heads // s.num_kv_heads
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        y = causal_attention(q, kk, vv, attention_mask, attn.scaling)
        hidden = hidden + attn.o_proj(y.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, k, v

    def head(self, hidden, attention_mask=None):
        return self.model.lm_head(self.core.norm(hidden))  # (B, T, V)

    def block_graph(self, i, opset):
        from . import llama_onnx

        why = llama_onnx.unsupported(self)
        if why is not None:
            log.info("block graphs through torch's exporter: %s", why)
            return None
        return llama_onnx.build_block(self, i, opset)
