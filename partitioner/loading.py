"""Resolve ``demo``, a local checkpoint folder, a hub id or a ``.gguf`` file; load it, and fingerprint it.

Hub ids and GGUF files become local checkpoint folders first (``sources.py``). The fingerprint
(``model_hash``) is the sha256 over config.json and the weight files; the bundle records it, and the
cloud refuses a session whose bundle was cut from other weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .sources import ModelNotFoundError, ModelOrigin, convert_gguf, download_hub, is_hub_id

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")

__all__ = ["DEMO_DIR", "ModelNotFoundError", "ModelOrigin", "load_model", "model_hash", "resolve_model",
           "resolve_source"]


def resolve_model(name_or_path: str | Path) -> Path:
    """``demo``, a folder, a hub id or a .gguf file -> a local Hugging Face checkpoint folder."""
    return resolve_source(name_or_path)[0]


def resolve_source(name_or_path: str | Path) -> tuple[Path, ModelOrigin]:
    """Like ``resolve_model``, and what the reference was (for the manifest's ``model_origin``)."""
    ref = str(name_or_path)
    if ref == "demo":
        path = DEMO_DIR
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"the demo model is missing from {path}; reinstall seamline or run `make demo-model`")
        return path, ModelOrigin("demo", "demo")
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder, origin = convert_gguf(path)
        return _check_folder(folder), origin
    if not path.exists() and is_hub_id(ref):
        folder, origin = download_hub(ref)
        return _check_folder(folder), origin
    if not path.exists():
        raise ModelNotFoundError(
            f"{path}: no such folder or file. Pass `demo`, a local Hugging Face checkpoint folder "
            "(config.json + model.safetensors), a hub id ORG/NAME, or a .gguf file")
    return _check_folder(path), ModelOrigin("folder", str(path.resolve()))


def _check_folder(path: Path) -> Path:
    if path.is_file() or not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"{path}: not a Hugging Face checkpoint folder; expected config.json and model weights "
            "(*.safetensors) inside it")
    if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        raise ModelNotFoundError(f"{path}: config.json found but no weights (*.safetensors or pytorch_model.bin)")
    return path


def model_hash(path: Path) -> str:
    """sha256 over config.json and every weight file, in name order."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(f for g in _WEIGHT_GLOBS for f in path.glob(g))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_type(path: Path) -> str:
    return json.loads((Path(path) / "config.json").read_text()).get("model_type", "")


def load_model(name_or_path: str | Path, dtype=None):
    """Load a checkpoint for the partitioner or the cloud; returns (model, path)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .families import ADAPTERS, UnsupportedModelError, supported_families

    path = resolve_model(name_or_path)
    mtype = model_type(path)
    if mtype not in ADAPTERS:
        raise UnsupportedModelError(
            f"{path}: model_type {mtype!r} is not supported; supported families: {supported_families()}")
    config = AutoConfig.from_pretrained(path)
    loader = AutoModel if mtype == "bert" else AutoModelForCausalLM
    model = loader.from_pretrained(path, config=config, dtype=dtype or torch.float32,
                                   attn_implementation="eager")
    return model.eval(), path


def load_tokenizer_path(path: Path) -> Path:
    tok = Path(path) / "tokenizer.json"
    if not tok.exists():
        raise ModelNotFoundError(f"{path}: no tokenizer.json; the edge needs a fast (Rust) tokenizer file")
    return tok
