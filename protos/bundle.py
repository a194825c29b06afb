"""The bundle manifest: the on-disk format of a partitioned model (DESIGN.md §3).

A bundle is a folder written by ``partition``::

    manifest.json         this dataclass as JSON
    embed.onnx            token ids + positions -> hidden
    block_00.onnx ...     one graph per exported block, KV cache in and out
    head.onnx             final norm + LM head (only when every layer is exported)
    tokenizer.json
    int8/...              optional int8-quantized copies of the graphs

ONNX graph conventions (batch B = 1 on the edge):
- embed: inputs ``input_ids`` int64 (B, T), ``position_ids`` int64 (B, T) -> ``hidden`` (B, T, C)
- decoder block: ``hidden`` (B, T, C), ``past_key``/``past_value`` (B, Hkv, P, D),
  ``position_ids`` int64 (B, T) -> ``hidden_out``, ``present_key``/``present_value`` (B, Hkv, P+T, D)
- encoder block: ``hidden``, ``attention_mask`` int64 (B, T) -> ``hidden_out``
- head: ``hidden`` -> ``logits`` (B, T, V); encoders: ``hidden``, ``attention_mask`` -> ``embedding`` (B, C)
An exporter may drop an input a graph does not use: feed only the names in ``session.get_inputs()``.

Pure data and validation: reading and hashing files is the only I/O here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class CodecDefaults:
    """Codec choice and calibration recorded by ``partition``.

    ``calibration`` maps a split layer k (as a string, JSON keys) to the statistics of the hidden
    state after block k-1: ``outlier_channels`` (list of int), ``absmax`` (float), ``rms`` (float).
    ``fidelity`` maps codec name -> measured figures (agreement, bytes ratio) when known.
    """

    codec: str = "int8"
    zstd_min_tokens: int = 8
    group_size: int = 32
    rotation_seed: int = 20260101
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Manifest:
    model_id: str
    model_source: str  # "demo" or the checkpoint path partition read (verify/profile reload it)
    family: str  # gpt2 | llama | bert
    model_type: str  # HF config.model_type
    model_config: dict[str, Any]
    source_model_hash: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    causal: bool
    edge_layers: int  # blocks [0, edge_layers) are exported
    default_split: int
    min_split: int  # privacy floor: the edge always runs at least this many layers
    max_split: int
    opset: int
    embed: str = "embed.onnx"
    blocks: list[str] = field(default_factory=list)
    head: str | None = None
    tokenizer: str = "tokenizer.json"
    int8: dict[str, Any] = field(default_factory=dict)  # {"embed":..., "blocks":[...], "head":...}
    eos_token_id: int | None = None
    tied_embedding: str | None = None  # external-data file shared by embed and head (tied weights, stored once)
    codec: CodecDefaults = field(default_factory=CodecDefaults)
    plan: dict[str, Any] = field(default_factory=dict)  # `partition --split auto` choice and table
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- derived -------------------------------------------------------------------------
    @property
    def has_all_layers(self) -> bool:
        """The edge can run the whole model (offline fallback)."""
        return self.edge_layers == self.num_layers and self.head is not None

    def allowed_splits(self) -> range:
        return range(self.min_split, self.max_split + 1)

    def check_split(self, k: int) -> int:
        if k not in self.allowed_splits():
            raise BundleError(
                f"split {k} is outside this bundle's range [{self.min_split}, {self.max_split}] "
                f"(privacy floor {self.min_split}, {self.edge_layers} exported edge layers); "
                "pick a split in range or re-run `partition` with other --min-edge-layers/--max-edge-layers")
        return k

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format version {version!r}, this seamline reads {FORMAT_VERSION}; "
                "re-run `partition` with this version of seamline")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.name not in d and f.default is f.default_factory is _MISSING]
        if missing:
            raise BundleError(f"{where}: missing keys {missing}; re-run `partition`")
        kw = {k: v for k, v in d.items() if k in known}
        kw["codec"] = CodecDefaults(**d.get("codec", {}))
        kw["files"] = {name: FileEntry(**e) for name, e in d.get("files", {}).items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{where}: not valid JSON ({e}); re-run `partition`") from e
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object; re-run `partition`")
        return cls.from_dict(d, where)

    # -- files ---------------------------------------------------------------------------
    def graph_files(self, int8: bool = False) -> list[str]:
        src = self.int8 if int8 else {"embed": self.embed, "blocks": self.blocks, "head": self.head}
        out = [src["embed"], *src["blocks"]]
        if src.get("head"):
            out.append(src["head"])
        return out


_MISSING = fields(Manifest)[0].default  # dataclasses.MISSING, without importing the private name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_files(manifest: Manifest, bundle_dir: Path) -> None:
    """Hash every file of the bundle (except the manifest) into ``manifest.files``."""
    bundle_dir = Path(bundle_dir)
    manifest.files = {
        p.relative_to(bundle_dir).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
        for p in sorted(bundle_dir.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME
        and not p.name.endswith(".png")
    }


def write_manifest(manifest: Manifest, bundle_dir: Path) -> Path:
    record_files(manifest, bundle_dir)
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def load_bundle(bundle_dir: Path | str, verify: bool = True) -> Manifest:
    """Read ``manifest.json`` and (by default) check every file's presence, size and sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.exists():
        raise BundleError(f"{path}: not found; is {bundle_dir} a bundle written by `partition`?")
    manifest = Manifest.from_json(path.read_text(), where=str(path))
    if verify:
        verify_files(manifest, bundle_dir)
    return manifest


def verify_files(manifest: Manifest, bundle_dir: Path) -> None:
    bundle_dir = Path(bundle_dir)
    needed = set(manifest.graph_files()) | {manifest.tokenizer}
    if manifest.tied_embedding:
        needed.add(manifest.tied_embedding)
    if manifest.int8:
        needed |= set(manifest.graph_files(int8=True))
    for name in sorted(needed - set(manifest.files)):
        raise BundleError(f"{bundle_dir / name}: listed by the manifest but has no sha256 entry; "
                          "re-run `partition`")
    for name, entry in sorted(manifest.files.items()):
        p = bundle_dir / name
        if not p.exists():
            raise BundleError(f"{p}: missing — re-run `partition` or copy the bundle again")
        if p.stat().st_size != entry.bytes:
            raise BundleError(f"{p}: size {p.stat().st_size} != {entry.bytes} in the manifest — "
                              "the file is truncated or altered; re-run `partition` or copy the bundle again")
        if sha256_file(p) != entry.sha256:
            raise BundleError(f"{p}: sha256 mismatch — re-run `partition` or copy the bundle again")
