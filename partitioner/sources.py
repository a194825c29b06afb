"""Where a ``--model`` comes from: a local folder, a Hugging Face hub id, or a ``.gguf`` file.

Every source ends as a local Hugging Face checkpoint folder (config.json, weights, tokenizer.json):

- a folder is used as it is;
- a hub id (``ORG/NAME``, optionally ``ORG/NAME@REVISION``) is downloaded with ``huggingface_hub``
  into its standard cache (``HF_HUB_CACHE`` / ``HF_HOME``); with ``HF_HUB_OFFLINE=1`` only the
  cache is read;
- a ``.gguf`` file is dequantized once with ``transformers`` into
  ``$SEAMLINE_CACHE/gguf/<sha256>`` (default ``~/.cache/seamline``); its ``source.json`` records
  the file's sha256, which the bundle copies into its manifest (``model_origin``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "source.json"
# GGUF general.architecture -> HF model_type, for the families the partitioner can cut
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt2": "gpt2"}
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?$")
# What a checkpoint folder needs from the hub (no other weight formats, no ONNX/GGUF copies)
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json"]


class ModelNotFoundError(FileNotFoundError):
    pass


def _families() -> str:
    from .families import supported_families

    return supported_families()


def _unsupported(message: str) -> ValueError:
    from .families import UnsupportedModelError

    return UnsupportedModelError(message)


@dataclass(frozen=True)
class ModelOrigin:
    """What ``--model`` named, recorded in the manifest (``model_origin``)."""

    kind: str                     # demo | folder | hub | gguf
    reference: str                # what the user passed (path made absolute)
    sha256: str = ""              # gguf: the file's sha256
    revision: str = ""            # hub: the resolved commit

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    @property
    def display_name(self) -> str:
        if self.kind == "hub":
            return self.reference
        return Path(self.reference).name.removesuffix(".gguf")


def cache_root() -> Path:
    return Path(os.environ.get("SEAMLINE_CACHE") or Path.home() / ".cache" / "seamline").expanduser()


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "~"))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The hub client's standard cache folder, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_hub(ref: str) -> tuple[Path, ModelOrigin]:
    """``ORG/NAME[@REV]`` -> the snapshot folder in the hub cache (downloaded unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    m = _HUB_ID.match(ref)
    repo, rev = m.group("repo"), m.group("rev")
    offline = hub_offline()
    try:
        path = Path(snapshot_download(repo, revision=rev, cache_dir=hub_cache(), local_files_only=offline,
                                      allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:
        hint = ("HF_HUB_OFFLINE is set and the hub cache has no snapshot of it: download it once with "
                "HF_HUB_OFFLINE unset" if offline else
                "the hub could not be reached and the cache has no snapshot of it; check the network")
        raise ModelNotFoundError(f"{ref}: not in the hub cache {hub_cache()} ({hint}), or pass a local folder "
                                 "or a .gguf file") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFoundError(f"{ref}: hub download failed ({type(e).__name__}: {e}); check the id, "
                                 "HF_TOKEN for gated models, or pass a local folder") from e
    return path, ModelOrigin("hub", ref, revision=path.name)


# ------------------------------------------------------------------------------------------------ GGUF


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; ModelNotFoundError for a file that is not GGUF."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelNotFoundError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}); the file is "
                                 f"corrupt or of another format. Supported families: {_families()}")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ModelNotFoundError("reading .gguf files needs the `gguf` package: pip install 'seamline[partitioner]'"
                                 ) from e
    try:
        field = GGUFReader(path, "r").fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # any parse failure of a damaged file
        raise ModelNotFoundError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e}); download it again. "
                                 f"Supported families: {_families()}") from e


def convert_gguf(path: Path) -> tuple[Path, ModelOrigin]:
    """Dequantize ``path`` once into ``cache_root()/gguf/<sha256>``; later calls reuse the folder."""
    path = Path(path).resolve()
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise _unsupported(f"{path}: GGUF architecture {arch!r} is not supported; supported families: "
                           f"{_families()}")
    digest = sha256_file(path)
    origin = ModelOrigin("gguf", str(path), sha256=digest)
    out = cache_root() / "gguf" / digest
    if (out / SOURCE_FILE).exists():
        return out, origin
    tmp = out.with_name(f"{digest}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _dequantize(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"format": "gguf", "file": path.name, "sha256": digest,
                                                   "architecture": arch}, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it meanwhile
            if not (out / SOURCE_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, origin


def _dequantize(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelNotFoundError(f"{path}: reading GGUF needs `gguf` and `accelerate` ({e}); "
                                 "pip install 'seamline[partitioner]'") from e
    except Exception as e:  # transformers raises many kinds for damaged or odd files
        raise _unsupported(f"{path}: cannot be loaded as GGUF ({type(e).__name__}: {e}); supported "
                           f"families: {_families()}") from e
    # save_pretrained refuses a model loaded from GGUF: rebuild it from its config and save that.
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
