"""Family adapters: how to cut each supported architecture. ``adapter_for(model)`` picks one."""

from __future__ import annotations

from .base import FamilyAdapter, ModelShape
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter

# HF config.model_type -> adapter
ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "gpt2": GPT2Adapter,
    "llama": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "mistral": LlamaAdapter,
    "bert": BertAdapter,
}


class UnsupportedModelError(ValueError):
    pass


def supported_families() -> str:
    return "GPT-2 (gpt2), Llama-family (llama, qwen2, mistral), BERT encoders (bert)"


def adapter_for(model) -> FamilyAdapter:
    model_type = getattr(model.config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {supported_families()}. "
            "Convert the checkpoint to one of these architectures or open an issue for a new adapter.")
    return cls(model)


__all__ = ["ADAPTERS", "FamilyAdapter", "ModelShape", "UnsupportedModelError", "adapter_for",
           "supported_families"]
