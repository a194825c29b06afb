"""The one interface every model family implements, used by the ONNX exporter and the cloud executor.

A transformer is cut into: ``embed`` (token ids -> hidden), ``block(i)`` for each layer, and
``head`` (final norm + LM head, or pooling for encoders). Every call takes explicit tensors —
no framework cache objects — so a block exports to one ONNX graph with KV inputs and outputs,
and the cloud can run the same block on a batch of sessions.

Shapes: hidden (B, T, C); past/present key and value (B, n_kv_heads, P, head_dim);
position_ids (B, T); attention_mask (B, P + T) with 1 for a valid key, 0 for padding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that the bundle, the edge and the cloud agree on."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    causal: bool  # False for encoders (BERT): no KV cache, the head pools


class FamilyAdapter(ABC):
    """Cuts one Hugging Face model of a family into embed / blocks / head."""

    family: str = ""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    _shape: ModelShape  # set by each adapter's __init__

    @property
    def shape(self) -> ModelShape:
        return self._shape

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids at (B, T) positions -> (B, T, C) hidden."""

    @abstractmethod
    def block(self, i: int, hidden: torch.Tensor, past_key: torch.Tensor | None,
              past_value: torch.Tensor | None, position_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run block i; return (hidden, present_key, present_value). Encoders return None caches. A past may be a
        ``CacheRoom`` (the cloud executor's): the new keys and values are then written into its buffer, and the
        present returned is a view of that buffer (the caller's, overwritten later)."""

    @abstractmethod
    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head -> (B, T, V) logits; encoders: pooled (B, C) sentence embedding."""

    def block_graph(self, i: int, opset: int):
        """Block i as an ``onnx.ModelProto`` built without torch's exporter (a family that can write its block
        around ONNX Runtime's fused operators does), or None: the exporter traces ``block``."""
        return

    def block_module(self, i: int) -> torch.nn.Module:
        """The module holding block i's weights: element i of the model's list of ``num_layers`` layers (the
        exporter swaps one block's weights for another's). A family whose blocks live elsewhere overrides."""
        n = self.shape.num_layers
        for _, m in self.model.named_modules():
            if isinstance(m, torch.nn.ModuleList) and len(m) == n:
                return m[i]
        raise LookupError(f"{type(self.model).__name__} has no list of {n} layer modules")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Causal attention of T new queries over P past + T new keys.

    q: (B, H, T, D); k, v: (B, H, P+T, D); attention_mask: (B, P+T) or None. Query t sits at
    key index P + t and sees keys 0..P+t that the mask marks valid.
    """
    t, s = q.shape[-2], k.shape[-2]
    qi = torch.arange(t, device=q.device).unsqueeze(-1) + (s - t)  # (T, 1)
    kj = torch.arange(s, device=q.device).unsqueeze(0)  # (1, S)
    allowed = (kj <= qi).unsqueeze(0).unsqueeze(0)  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


@dataclass(frozen=True)
class CacheRoom:
    """A past that already sits in a buffer with room for the new positions: ``full`` (B, Hkv, P + T, D) holds
    the past at [0, P) (``past`` = P); ``concat_cache`` writes the new keys or values at [P, P + T) in place and
    returns ``full``, where a ``torch.cat`` would copy the whole past again. The cloud executor passes these
    (views of its KV slab, or of a batch's gathered copy); the ONNX exporter passes plain tensors."""

    full: torch.Tensor
    past: int


def concat_cache(past: torch.Tensor | CacheRoom | None, new: torch.Tensor) -> torch.Tensor:
    """Past and new keys (or values) along the positions: (B, Hkv, P + T, D)."""
    if past is None:
        return new
    if isinstance(past, CacheRoom):
        end = past.past + new.shape[-2]
        if end != past.full.shape[-2]:
            raise ValueError(f"a cache room of {past.full.shape[-2]} positions cannot take {past.past} past and "
                             f"{new.shape[-2]} new ones")
        past.full[:, :, past.past:end] = new
        return past.full
    return torch.cat([past, new], dim=-2)
