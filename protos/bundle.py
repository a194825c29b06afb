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

The bundle is a closed box. ``load_bundle`` validates the manifest against its schema (the
dataclasses below: every key known, every value of its declared type, ranges and cross-field
rules in ``Manifest.validate``) and raises one ``BundleError`` naming the field. Every path the
manifest names must be relative, without ``..``, and resolve (symlinks followed) to a regular file
inside the bundle folder; sizes are compared before anything is hashed. Nothing outside the
bundle is opened or stat-ed. A new optional field is a dataclass field with a default: the
schema follows the type annotation (``str``, ``int``, ``float``, ``bool``, ``X | None``,
``list[X]``, ``dict[str, X]``, a nested dataclass, ``Any``); add range rules to ``validate``.

Pure data and validation: reading and hashing files is the only I/O here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from seamline.protos.codec import CODEC_NAMES

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "int4", "int8", "int8-dynamic")  # of a bundle's edge graphs (partition --quantize-edge)
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest is a few KB; refuse to read a huge one
MAX_INT = 2**31 - 1  # what the wire's int32 fields carry
# Block graph metadata (ONNX model properties) the partitioner writes and the edge runtime reads:
KV_IN_PLACE_META = "seamline.kv_in_place"  # "1": past/present may be one buffer, appended to in place
ROPE_META = "seamline.rope"  # JSON inv_freq and scaling of the graph's rope_cos / rope_sin input tables
RESCORE_META = "seamline.head_rescore"  # JSON: where a level-4 head's rows are, to make its top logits exact
HEAD_INPUT = "head_input"  # such a head graph's second output: the float row its MatMulNBits multiplies
HEAD_TOP_IDS = "head_top_ids"  # and its third: the ids of its largest logits, the ones to make exact
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-run `partition` with this version of seamline (or correct the field)"


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
    state after block k-1: ``outlier_channels`` (list of int), ``absmax`` (float), ``rms`` (float), and the
    channels of codecs with their own entry (``rot_outlier_channels``: int8-rot, ``int4_outlier_channels``:
    int4-rot-outlier; see ``protos/codec.py`` calibrate).
    ``fidelity`` maps codec name -> measured figures (agreement, bytes ratio) when known; ``by_split``
    (str(k) -> agreement, from ``seamline bench codec``) lets the planner's budget decide per split.
    """

    codec: str = "int8"
    zstd_min_tokens: int = 8
    group_size: int = 32
    rotation_seed: int = 20260101
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class DraftHead:
    """A shallow-exit draft head for one split k (``partition --draft-head``; ``partitioner/draft_head.py``).

    ``graph``: hidden ``(1, T, C)`` at layer k -> ``logits`` (1, T, V) and ``draft_ids`` int64 (1, T);
    ``lm_head``: the external-data file holding the LM head it shares (the tied embedding or
    ``draft_lm_head.bin``), None when stored inside the graph; ``acceptance``: top-1 agreement with the
    full model's greedy next token on held-out text; ``train``: how it was trained (figures, settings).
    """

    graph: str
    acceptance: float
    lm_head: str | None = None
    heldout_tokens: int = 0
    train: dict[str, Any] = field(default_factory=dict)


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
    # precision of the graphs embed/blocks/head name (one of PRECISIONS); `quantization` says how they were
    # quantized (method, bits, block_size, accuracy_level, tool); `variants` are other precisions shipped
    # next to them (e.g. "fp32" with `partition --keep-fp32`). The legacy `int8` set reads as "int8-dynamic".
    precision: str = "fp32"
    quantization: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, GraphSet] = field(default_factory=dict)
    eos_token_id: int | None = None
    tied_embedding: str | None = None  # external-data file shared by embed and head (tied weights, stored once)
    chat_template: str | None = None  # the model's chat template (edge/chat.py); None: plain chat format
    model_origin: dict[str, Any] = field(default_factory=dict)  # what --model named: kind, reference, sha256
    codec: CodecDefaults = field(default_factory=CodecDefaults)
    plan: dict[str, Any] = field(default_factory=dict)  # `partition --split auto` choice and table
    # `seamline privacy` measurement: recovery_top1 (str(k) -> share of tokens read back), its settings
    privacy: dict[str, Any] = field(default_factory=dict)
    draft_heads: dict[str, DraftHead] = field(default_factory=dict)  # str(k) -> shallow-exit head at split k
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

    def precisions(self) -> list[str]:
        """The precisions whose graphs this bundle ships, its own first."""
        out = [self.precision, *self.variants]
        return out + ["int8-dynamic"] if self.int8 and "int8-dynamic" not in out else out

    def graph_set(self, precision: str | None = None) -> dict[str, Any]:
        """``{"embed", "blocks", "head", "quantization"}`` of the graphs at ``precision`` (default: the bundle's)."""
        p = precision or self.precision
        if p == self.precision:
            return {"embed": self.embed, "blocks": self.blocks, "head": self.head, "quantization": self.quantization}
        if p in self.variants:
            return asdict(self.variants[p])
        if p == "int8-dynamic" and self.int8:
            return {"embed": self.int8["embed"], "blocks": self.int8["blocks"], "head": self.int8.get("head"),
                    "quantization": {"method": "dynamic", "bits": 8}}
        raise BundleError(f"no {p} graphs in this bundle (it ships {', '.join(self.precisions())}); pick one of "
                          f"those, or re-run `partition --quantize-edge {p}` (--keep-fp32 keeps fp32 graphs too)")

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        """Build and validate a manifest from parsed JSON; BundleError names the first bad field."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object; {_FIX}")
        version = d.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise BundleError(
                f"{where}: bundle format version {_show(version)}, this seamline reads {FORMAT_VERSION}; "
                "re-run `partition` with this version of seamline")
        missing = [f.name for f in fields(cls)
                   if f.name not in d and f.default is f.default_factory is _MISSING]
        if missing:
            raise BundleError(f"{where}: missing keys {missing}; re-run `partition`")
        manifest = _build(cls, d, "", where)
        manifest.validate(where)
        return manifest

    def validate(self, where: str = MANIFEST_NAME) -> None:
        """Ranges and cross-field rules (types were checked by the schema)."""
        def bad(name: str, why: str) -> BundleError:
            return BundleError(f"{where}: field `{name}`: {why}; {_FIX}")

        for name, lo in (("num_layers", 1), ("hidden_size", 1), ("num_heads", 1), ("num_kv_heads", 1),
                         ("head_dim", 1), ("vocab_size", 1), ("max_positions", 2), ("opset", 1)):
            value = getattr(self, name)
            if not lo <= value <= MAX_INT:
                raise bad(name, f"must be an integer in [{lo}, {MAX_INT}], got {value}")
        if not 0 <= self.edge_layers <= self.num_layers:
            raise bad("edge_layers", f"must be in [0, num_layers={self.num_layers}], got {self.edge_layers}")
        if not 0 <= self.min_split <= self.max_split <= self.edge_layers:
            raise bad("min_split", f"need 0 <= min_split ({self.min_split}) <= max_split ({self.max_split}) "
                                   f"<= edge_layers ({self.edge_layers})")
        if not self.min_split <= self.default_split <= self.max_split:
            raise bad("default_split", f"must be in [min_split={self.min_split}, "
                                       f"max_split={self.max_split}], got {self.default_split}")
        if len(self.blocks) != self.edge_layers:
            raise bad("blocks", f"lists {len(self.blocks)} graphs for edge_layers={self.edge_layers}")
        if self.head is not None and self.edge_layers != self.num_layers:
            raise bad("head", f"a head graph needs every layer on the edge (edge_layers={self.edge_layers}, "
                              f"num_layers={self.num_layers})")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise bad("eos_token_id",
                      f"must be in [0, vocab_size={self.vocab_size}), got {self.eos_token_id}")
        c = self.codec
        if c.codec not in CODEC_NAMES:
            raise bad("codec.codec",
                      f"unknown codec {_show(c.codec)}; expected one of {', '.join(CODEC_NAMES)}")
        if not 0 <= c.zstd_min_tokens <= MAX_INT:
            raise bad("codec.zstd_min_tokens", f"must be in [0, {MAX_INT}], got {c.zstd_min_tokens}")
        if not 1 <= c.group_size <= MAX_INT:
            raise bad("codec.group_size", f"must be in [1, {MAX_INT}], got {c.group_size}")
        if not 0 <= c.rotation_seed < 2**64:
            raise bad("codec.rotation_seed", f"must be in [0, 2**64), got {c.rotation_seed}")
        if self.int8:
            extra = sorted(set(self.int8) - {"embed", "blocks", "head"})
            if extra:
                raise bad(f"int8.{extra[0]}", "unknown key (expected embed, blocks, head)")
            _build(_Int8Graphs, self.int8, "int8.", where)
            if len(self.int8["blocks"]) != self.edge_layers:
                raise bad("int8.blocks",
                          f"lists {len(self.int8['blocks'])} graphs for edge_layers={self.edge_layers}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"unknown precision {_show(self.precision)}; expected one of {', '.join(PRECISIONS)}")
        for p, v in self.variants.items():
            if p not in PRECISIONS or p == self.precision:
                raise bad(f"variants.{p}", f"must be one of {', '.join(PRECISIONS)} other than {self.precision}")
            if len(v.blocks) != self.edge_layers:
                raise bad(f"variants.{p}.blocks", f"lists {len(v.blocks)} graphs for edge_layers={self.edge_layers}")
        for key, d in self.draft_heads.items():
            if not (key.isascii() and key.isdigit()) or not 0 <= int(key) <= self.edge_layers:
                raise bad(f"draft_heads.{key}", f"the key must be a split in [0, edge_layers={self.edge_layers}]")
            if not 0.0 <= d.acceptance <= 1.0:
                raise bad(f"draft_heads.{key}.acceptance", f"must be in [0, 1], got {d.acceptance}")
            if not 0 <= d.heldout_tokens <= MAX_INT:
                raise bad(f"draft_heads.{key}.heldout_tokens", f"must be in [0, {MAX_INT}], got {d.heldout_tokens}")
        for name, entry in self.files.items():
            if not _SHA256.fullmatch(entry.sha256):
                raise bad(f"files.{name}.sha256", "must be 64 lowercase hex digits")
            if not 0 <= entry.bytes <= 2**40:
                raise bad(f"files.{name}.bytes", f"must be in [0, 2**40], got {entry.bytes}")
        for name, path in self.named_paths():
            _relative(path, name, where)

    def named_paths(self) -> list[tuple[str, str]]:
        """(field, path) of every path the manifest names."""
        out = [("embed", self.embed), *((f"blocks[{i}]", b) for i, b in enumerate(self.blocks)),
               ("tokenizer", self.tokenizer)]
        if self.head is not None:
            out.append(("head", self.head))
        if self.tied_embedding is not None:
            out.append(("tied_embedding", self.tied_embedding))
        if self.chat_template is not None:
            out.append(("chat_template", self.chat_template))
        if self.int8:
            out.append(("int8.embed", self.int8["embed"]))
            out += [(f"int8.blocks[{i}]", b) for i, b in enumerate(self.int8["blocks"])]
            if self.int8.get("head") is not None:
                out.append(("int8.head", self.int8["head"]))
        for p, v in self.variants.items():
            out += [(f"variants.{p}.embed", v.embed), *((f"variants.{p}.blocks[{i}]", b) for i, b in enumerate(v.blocks))]
            if v.head is not None:
                out.append((f"variants.{p}.head", v.head))
        for key, d in self.draft_heads.items():
            out.append((f"draft_heads.{key}.graph", d.graph))
            if d.lm_head is not None:
                out.append((f"draft_heads.{key}.lm_head", d.lm_head))
        out += [(f"files.{name}", name) for name in self.files]
        return out

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"{where}: not valid JSON ({e}); re-run `partition`") from None
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


@dataclass
class GraphSet:
    """The graphs of one more precision a bundle ships (``Manifest.variants``)."""

    embed: str
    blocks: list[str]
    head: str | None = None
    quantization: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Int8Graphs:
    """The schema of ``Manifest.int8`` when it is not empty."""

    embed: str
    blocks: list[str]
    head: str | None = None


# -- the schema: the dataclasses' annotations -------------------------------------------------------

def _show(value: Any) -> str:
    scalar = isinstance(value, (str, int, float, bool, type(None)))
    text = json.dumps(value) if scalar else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _conform(value: Any, tp: Any, name: str, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (nested dataclasses built); BundleError otherwise."""
    def bad() -> BundleError:
        return BundleError(f"{where}: field `{name}`: expected {_type_name(tp)}, got {_show(value)}; {_FIX}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _conform(value, a, name, where)
                except BundleError:
                    if len(args) > 2:
                        continue
                    raise bad() from None
        raise bad()
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_conform(v, item, f"{name}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        item = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _conform(v, item, f"{name}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, f"{name}.", where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


def _build(cls: type, d: dict[str, Any], prefix: str, where: str) -> Any:
    """A dataclass from a JSON object: unknown keys, missing keys and wrong types name the field."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in d:
        if key not in known:
            raise BundleError(f"{where}: field `{prefix}{key}`: unknown key (this seamline reads bundle "
                              f"format {FORMAT_VERSION}); {_FIX}")
    kw = {}
    for name, f in known.items():
        if name not in d:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise BundleError(f"{where}: field `{prefix}{name}`: missing; {_FIX}")
            continue
        kw[name] = _conform(d[name], hints[name], prefix + name, where)
    return cls(**kw)


# -- paths: every one stays inside the bundle ---------------------------------------------------------

def _relative(path: str, name: str, where: str) -> None:
    """A manifest path must be relative, plain, and never climb out (checked before any file access)."""
    p = PurePosixPath(path)
    why = None
    if not path or path.strip() != path:
        why = "is empty or has surrounding whitespace"
    elif "\x00" in path or "\\" in path:
        why = "contains a NUL or a backslash"
    elif p.is_absolute() or re.match(r"[A-Za-z]:", path):
        why = "is an absolute path"
    elif ".." in p.parts:
        why = "climbs out with `..`"
    elif path == MANIFEST_NAME:
        why = "names the manifest itself"
    if why:
        raise BundleError(f"{where}: field `{name}`: the path {_show(path)} {why}; every file must be named "
                          f"relative to the bundle folder and lie inside it; {_FIX}")


def bundle_file(bundle_dir: Path | str, name: str, max_bytes: int | None = None) -> Path:
    """The real path of ``name`` inside ``bundle_dir``: a regular file that does not leave the folder.

    Symlinks are followed only while they stay inside; nothing outside is stat-ed or opened.
    """
    _relative(name, name, str(Path(bundle_dir) / MANIFEST_NAME))
    root = Path(bundle_dir).resolve()
    shown = Path(bundle_dir) / name
    real = (root / name).resolve()
    if real != root and root not in real.parents:
        raise BundleError(f"{shown}: a symlink that leads outside the bundle folder; copy the file into the "
                          "bundle instead of linking it (or re-run `partition`)")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise BundleError(f"{shown}: missing — re-run `partition` or copy the bundle again") from None
    except OSError as e:
        raise BundleError(f"{shown}: cannot be read ({e.strerror}); fix its permissions or copy the bundle "
                          "again") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{shown}: not a regular file; a bundle holds only plain files — re-run "
                          "`partition` or copy the bundle again")
    if max_bytes is not None and st.st_size > max_bytes:
        raise BundleError(f"{shown}: {st.st_size} bytes, more than the {max_bytes} allowed; "
                          "re-run `partition`")
    return real


def sha256_file(path: Path, limit: int | None = None) -> str:
    """sha256 of the file; with ``limit``, reading stops after limit + 1 bytes (a file that grew)."""
    h = hashlib.sha256()
    left = None if limit is None else limit + 1
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
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
    """Read and validate ``manifest.json``; check every file's place, kind and size, and (by default)
    its sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.exists():
        raise BundleError(f"{path}: not found; is {bundle_dir} a bundle written by `partition`?")
    real = _manifest_path(bundle_dir)
    try:
        text = real.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot be read ({e}); re-run `partition`") from None
    manifest = Manifest.from_json(text, where=str(path))
    verify_files(manifest, bundle_dir, hashes=verify)
    return manifest


def _manifest_path(bundle_dir: Path) -> Path:
    root = bundle_dir.resolve()
    real = (root / MANIFEST_NAME).resolve()
    shown = bundle_dir / MANIFEST_NAME
    if real.parent != root:
        raise BundleError(f"{shown}: a symlink that leads outside the bundle folder; copy the manifest in")
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{shown}: not a regular file; re-run `partition`")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{shown}: {st.st_size} bytes, more than {MAX_MANIFEST_BYTES}; this is no manifest "
                          "written by `partition`")
    return real


def verify_files(manifest: Manifest, bundle_dir: Path, hashes: bool = True) -> None:
    """Every file the manifest names is listed in ``files``, lies inside the bundle, is a regular file of
    the listed size, and (``hashes``) has the listed sha256. Sizes are checked before any hashing."""
    bundle_dir = Path(bundle_dir)
    needed = {path for _, path in manifest.named_paths()}
    for name in sorted(needed - set(manifest.files)):
        raise BundleError(f"{bundle_dir / name}: listed by the manifest but has no sha256 entry; "
                          "re-run `partition`")
    real: dict[str, Path] = {}
    for name, entry in sorted(manifest.files.items()):
        p = real[name] = bundle_file(bundle_dir, name)
        size = p.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{bundle_dir / name}: size {size} != {entry.bytes} in the manifest — "
                              "the file is truncated or altered; re-run `partition` or copy the bundle again")
    if not hashes:
        return
    for name, entry in sorted(manifest.files.items()):
        if sha256_file(real[name], entry.bytes) != entry.sha256:
            raise BundleError(f"{bundle_dir / name}: sha256 mismatch — re-run `partition` or copy the bundle "
                              "again")


def external_tensor(name: str, dtype: int, dims: list[int], location: str, offset: int, length: int):
    """An ONNX initializer whose bytes are ``length`` bytes at ``offset`` of the file ``location`` (next to the
    graph): how a bundle's graphs share one table file, and how a composed edge segment reads its blocks'
    weights. ONNX's ``set_external_data`` needs the bytes in the tensor first; these are already on disk."""
    import onnx

    t = onnx.TensorProto(name=name, data_type=dtype, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t
