"""Segments: one ONNX graph for a run of consecutive in-place block graphs ``[first, stop)``.

A decode step through 30 block graphs is 30 ONNX Runtime calls, each with its own binding, dispatch and
thread-pool hand-off; one graph for the run is one call (on SmolLM2-135M int4, 30 blocks: 19.8 against
25.0 ms per token for the blocks alone). The bundle still ships one graph per block, so any split point
stays available without a new export: the runtime composes the runs it needs when it loads and when the
split moves (``EdgeRuntime._cut``).

The composed graph carries no weights of its own. Each initializer of a block file becomes an external-data
reference into that same file (the tensor's bytes are stored contiguously there), and ONNX Runtime reads
them from the block files, folder given by ``FOLDER_KEY``: no second copy on disk, none in this process
beyond what ONNX Runtime itself keeps (measured: the same resident memory as the per-block sessions).

Names inside the composed graph: ``hidden`` in, ``hidden_out`` out, the shared ``position_ids`` /
``rope_cos`` / ``rope_sin`` inputs, and per block i (its index in the whole model) ``past_key.i``,
``past_value.i``, ``present_key.i``, ``present_value.i`` (``kv_names``). Every other tensor and node name is
prefixed with ``b<i>/``.

Pure composition on ONNX protos; the only I/O is reading the block files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seamline.protos.bundle import KV_IN_PLACE_META, ROPE_META, external_tensor

FOLDER_KEY = "session.model_external_initializers_file_folder_path"  # ONNX Runtime session config entry
SHARED = ("position_ids", "rope_cos", "rope_sin")  # inputs every block of a run reads as they are
NEEDED = ("hidden", "past_key", "past_value", "position_ids")
OUTPUTS = ("hidden_out", "present_key", "present_value")
INLINE_BYTES = 1024  # initializers smaller than this stay inside the composed graph


class NotComposable(Exception):
    """These block graphs cannot run as one graph (the runtime keeps one session per block); says why."""


class UnreadableBlock(ValueError):
    """A block file that does not parse as an ONNX model; ``path`` is the file."""

    def __init__(self, path: Path):
        super().__init__(f"{path} does not parse as an ONNX model")
        self.path = path


@dataclass(frozen=True)
class Composed:
    """A composed graph: serialized model, the folder its external data is read from, the blocks' metadata."""

    model: bytes
    folder: Path
    first: int
    stop: int
    meta: dict[str, str]


def kv_names(i: int) -> tuple[str, str, str, str]:
    """past_key, past_value, present_key, present_value of block ``i`` inside a composed graph."""
    return f"past_key.{i}", f"past_value.{i}", f"present_key.{i}", f"present_value.{i}"


def _renamer(i: int, first: int, last: bool):
    own = dict(zip(("past_key", "past_value", "present_key", "present_value"), kv_names(i)))

    def rename(name: str) -> str:
        if name == "" or name in SHARED:
            return name
        if name in own:
            return own[name]
        if name == "hidden":
            return "hidden" if i == first else f"b{i - 1}/hidden_out"
        if name == "hidden_out" and last:
            return "hidden_out"
        return f"b{i}/{name}"
    return rename


def compose(paths: list[Path], first: int) -> Composed:
    """One graph for the block files ``paths`` (blocks ``first``, ``first + 1``, ...). Raises NotComposable
    when a block is not an in-place graph of the expected interface, when the blocks' rotary tables differ,
    or when they do not share one folder; UnreadableBlock for a file that is not a model."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import TensorProto, helper

    def renamed(v, name: str):
        copy = onnx.ValueInfoProto()  # a copy: a reference into a block's model would keep its bytes alive
        copy.CopyFrom(v)
        copy.name = name
        return copy

    if not paths:
        raise NotComposable("no blocks")
    folder = paths[0].parent
    nodes, inits, inputs, outputs = [], [], [], []
    small: dict[tuple, str] = {}  # a small constant's contents -> the name it has in the composed graph
    opsets: dict[str, int] = {}
    ir_version = 0
    meta: dict[str, str] | None = None
    for j, path in enumerate(paths):
        i = first + j
        if path.parent != folder:
            raise NotComposable(f"{path} is not in {folder} with the other blocks")
        data = path.read_bytes()
        try:
            model = onnx.ModelProto.FromString(data)
        except DecodeError:
            raise UnreadableBlock(path) from None
        props = {p.key: p.value for p in model.metadata_props}
        if props.get(KV_IN_PLACE_META) != "1":
            raise NotComposable(f"{path.name} does not append to its cache in place")
        if meta is None:
            meta = props
        elif props.get(ROPE_META) != meta.get(ROPE_META):
            raise NotComposable(f"{path.name} has other rotary tables than block {first}")
        g = model.graph
        names_in = [v.name for v in g.input]
        if not set(NEEDED) <= set(names_in) <= set(NEEDED) | set(SHARED):
            raise NotComposable(f"{path.name} takes {names_in}")
        if {v.name for v in g.output} != set(OUTPUTS) or len(g.sparse_initializer):
            raise NotComposable(f"{path.name} returns {[v.name for v in g.output]}")
        block_rename = _renamer(i, first, j == len(paths) - 1)
        # Small constants equal to one an earlier block holds are that one (the lengths every block derives
        # from position_ids): ONNX Runtime's common-subexpression pass then computes them once per call.
        alias: dict[str, str] = {}
        for t in g.initializer:
            if len(t.raw_data) < INLINE_BYTES and t.data_location != TensorProto.EXTERNAL:
                key = (t.data_type, tuple(t.dims), t.raw_data, tuple(t.float_data), tuple(t.int64_data),
                       tuple(t.int32_data))
                alias[t.name] = small.setdefault(key, block_rename(t.name))

        def rename(name: str, alias=alias, block_rename=block_rename) -> str:
            return alias.get(name) or block_rename(name)

        for k, n in enumerate(g.node):
            node = onnx.NodeProto()  # copies: a reference into `model` would keep all of its bytes alive
            node.CopyFrom(n)
            node.input[:] = [rename(x) for x in n.input]
            node.output[:] = [rename(x) for x in n.output]
            node.name = f"b{i}/{k}/{n.name}"
            nodes.append(node)
        for t in g.initializer:
            raw = t.raw_data
            if t.name in alias and alias[t.name] != block_rename(t.name):
                continue  # an earlier block's constant stands for it
            if len(raw) >= INLINE_BYTES and t.data_location != TensorProto.EXTERNAL:
                offset = data.find(raw)  # the serialized tensor holds its bytes as they are
                ref = external_tensor(t.name, t.data_type, list(t.dims), path.name, offset, len(raw))
            else:  # small, or already external (relative to this folder)
                ref = TensorProto()
                ref.CopyFrom(t)
            ref.name = rename(t.name)
            inits.append(ref)
        for v in g.input:
            if j == 0 or v.name not in ("hidden", *SHARED):
                inputs.append(renamed(v, rename(v.name)))
        for v in g.output:
            if v.name != "hidden_out" or j == len(paths) - 1:
                outputs.append(renamed(v, rename(v.name)))
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        ir_version = max(ir_version, model.ir_version)
        del model, data
    graph = helper.make_graph(nodes, f"blocks_{first}_{first + len(paths)}", inputs, outputs, inits)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    merged.ir_version = ir_version
    keep = {k: v for k, v in (meta or {}).items() if k in (KV_IN_PLACE_META, ROPE_META)}
    helper.set_model_props(merged, keep)
    return Composed(merged.SerializeToString(), folder, first, first + len(paths), keep)
