"""A quantized embedding table read row by row from its file: the embedding of a weight-only bundle.

A ``--quantize-edge int4|int8`` bundle of a tied model stores the token table once, quantized, in
``tied_embedding.q.bin`` (``partitioner/quantize.share_quantized_table``); the LM head's MatMulNBits and
the embedding graph's one ``GatherBlockQuantized`` node read it. ONNX Runtime maps that file into memory,
and each row a prompt touches makes the kernel map the pages around it as well (fault-around): a 512-token
prompt left 28 MB of SmolLM2's 32 MB table resident in the edge process for ~0.3 MB of rows (measured with
``/proc/self/smaps``). :class:`QuantizedRows` reads each row it needs with ``os.pread`` instead (data,
scales and zero points: three reads per token, from the page cache once warm) and dequantizes as the
operator does, ``(q - zero point) * scale`` per block of ``block_size`` along the row, bit for bit the same
floats (``tests/edge/test_table.py``). Only this one graph form is taken (``QuantizedRows.of`` returns None
otherwise and the runtime runs the graph in ONNX Runtime).

The same reader serves the LM head's exact rescoring (:func:`rescore_top`): a level-4 head graph says in its
metadata where its rows are (``QuantizedRows.of_head``), and the runtime recomputes its top logits from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DTYPES = {1: np.float32, 10: np.float16}  # scales: float, float16
GRAPH_MAX_BYTES = 64 * 1024  # the one-node graph over external data is ~2 KB; an embedding with inline weights
#                              (GPT-2's position table: 3 MB) is left to ONNX Runtime without reading it here
_UINT8 = 2


@dataclass(frozen=True)
class _Field:
    offset: int
    row_bytes: int


@dataclass
class QuantizedRows:
    """Rows of a (V, C) table stored as blocks of ``block_size`` ``bits``-bit values along C."""

    path: Path
    vocab: int
    width: int
    bits: int
    block_size: int
    data: _Field
    scales: _Field
    scale_dtype: type
    zero_points: _Field | None
    _fd: int = -1

    @classmethod
    def of(cls, graph: Path, resolve=None) -> QuantizedRows | None:
        """The table behind ``graph`` when it is one GatherBlockQuantized(table, input_ids, scales[, zero
        points]) -> hidden over external data in one file; else None. ``resolve`` turns the data's location
        (relative to the graph's folder) into a path (the runtime's checks that it stays in the bundle);
        raises ValueError when the file is shorter than the tensors it should hold."""
        import onnx
        from onnx import helper

        if Path(graph).stat().st_size > GRAPH_MAX_BYTES:  # weights inline: not this form, and not parsed twice
            return None
        model = onnx.load(str(graph), load_external_data=False)
        g = model.graph
        if len(g.node) != 1:
            return None
        node = g.node[0]
        if (node.op_type != "GatherBlockQuantized" or node.domain != "com.microsoft" or len(node.input) < 3
                or node.input[1] != "input_ids" or [o.name for o in g.output] != list(node.output)):
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, bs = attrs.get("bits", 4), attrs.get("block_size", 128)
        if attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) not in (1, -1) or bits not in (4, 8):
            return None
        inits = {t.name: t for t in g.initializer}
        names = [n for n in node.input[:4] if n and n != "input_ids"]
        if not all(n in inits for n in names):
            return None
        tensors = [inits[n] for n in names]
        refs = []
        for t in tensors:
            ext = {e.key: e.value for e in t.external_data}
            if t.data_location != onnx.TensorProto.EXTERNAL or "location" not in ext or len(t.dims) != 2:
                return None
            refs.append(ext)
        if len({r["location"] for r in refs}) != 1:
            return None
        data, scales = tensors[0], tensors[1]
        vocab, packed = data.dims
        width = packed * 8 // bits
        blocks = -(-width // bs)
        if (data.data_type != _UINT8 or scales.data_type not in _DTYPES or list(scales.dims) != [vocab, blocks]
                or width % bs):
            return None
        zp = tensors[2] if len(tensors) > 2 else None
        if zp is not None and (zp.data_type != _UINT8 or list(zp.dims) != [vocab, -(-blocks * bits // 8)]):
            return None

        path = Path(resolve(refs[0]["location"]) if resolve else graph.parent / refs[0]["location"])
        size = path.stat().st_size

        def field(t, ref) -> _Field:
            row = int(np.prod(t.dims[1:])) * np.dtype(_DTYPES.get(t.data_type, np.uint8)).itemsize
            offset, length = int(ref.get("offset", 0)), int(ref.get("length", row * t.dims[0]))
            if length != row * t.dims[0] or offset < 0 or offset + length > size:
                raise ValueError(f"{graph}: {t.name} ({list(t.dims)}) should be {row * t.dims[0]} bytes at "
                                 f"offset {offset} of {path.name} ({size} bytes); the bundle is damaged — "
                                 "re-run `partition` or copy the bundle again")
            return _Field(offset, row)

        return cls(path, vocab, width, bits, bs, field(data, refs[0]), field(scales, refs[1]),
                   _DTYPES[scales.data_type], field(zp, refs[2]) if zp is not None else None)

    @classmethod
    def of_head(cls, meta: str, resolve) -> QuantizedRows:
        """The LM head's rows from its graph's rescoring metadata (``partitioner/quantize.mark_head_rescoring``:
        JSON with the table file, vocab, width, bits, block_size and per field [offset, row bytes]).
        ``resolve`` turns the file's location into a path. Raises ValueError when the metadata is malformed or
        the file is shorter than it says."""
        import json

        try:
            m = json.loads(meta)
            vocab, width, bits, bs = (int(m[k]) for k in ("vocab", "width", "bits", "block_size"))
            spans = {k: (int(m[k][0]), int(m[k][1])) for k in ("data", "scales", "zero_points") if m.get(k)}
            location = str(m["location"])
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
            raise ValueError(f"the head graph's {meta[:80]!r} rescoring metadata is malformed ({e}); "
                             "re-run `partition`") from None
        blocks = -(-width // bs) if bs > 0 else 0
        want = {"data": width * bits // 8, "scales": blocks * 4, "zero_points": -(-blocks * bits // 8)}
        path = Path(resolve(location))
        size = path.stat().st_size
        if (bits not in (4, 8) or bs <= 0 or width <= 0 or width % bs or vocab <= 0 or "data" not in spans
                or "scales" not in spans or any(spans[k][1] != want[k] for k in spans)
                or any(off < 0 or off + row * vocab > size for off, row in spans.values())):
            raise ValueError(f"{path}: the head graph's rescoring metadata does not fit this table ({meta[:200]}); "
                             "the bundle is damaged — re-run `partition` or copy the bundle again")
        zp = spans.get("zero_points")
        return cls(path, vocab, width, bits, bs, _Field(*spans["data"]), _Field(*spans["scales"]), np.float32,
                   _Field(*zp) if zp else None)

    def _read(self, f: _Field, ids: np.ndarray) -> np.ndarray:
        out = bytearray(f.row_bytes * len(ids))
        view = memoryview(out)
        for j, i in enumerate(ids.tolist()):
            got = os.preadv(self._fd, [view[j * f.row_bytes:(j + 1) * f.row_bytes]], f.offset + i * f.row_bytes)
            if got != f.row_bytes:
                raise ValueError(f"{self.path}: short read of row {i} ({got} of {f.row_bytes} bytes); the bundle "
                                 "file is truncated — copy the bundle again")
        return np.frombuffer(out, dtype=np.uint8).reshape(len(ids), f.row_bytes)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows (T, C) float32 of token ids ``ids`` (any shape; flattened)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            bad = int(ids[(ids < 0) | (ids >= self.vocab)][0])
            raise ValueError(f"token id {bad} is outside the embedding table (0..{self.vocab - 1})")
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        blocks = self.width // self.block_size
        q = self._read(self.data, ids)
        if self.bits == 4:
            q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(len(ids), self.width)
        scales = self._read(self.scales, ids).view(self.scale_dtype).astype(np.float32)
        if self.zero_points is None:
            zp = np.full((len(ids), blocks), 1 << (self.bits - 1), dtype=np.float32)
        else:
            z = self._read(self.zero_points, ids)
            if self.bits == 4:
                z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(len(ids), -1)
            zp = z[:, :blocks].astype(np.float32)
        w = q.reshape(len(ids), blocks, self.block_size).astype(np.float32) - zp[..., None]
        return (w * scales[..., None]).reshape(len(ids), self.width)

    def run(self, input_ids: np.ndarray, **_) -> tuple[np.ndarray]:
        """The embedding graph's call: hidden (1, T, C) for input_ids (1, T)."""
        ids = np.asarray(input_ids)
        return (self.rows(ids).reshape(*ids.shape, self.width),)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def rescore_top(logits: np.ndarray, x: np.ndarray, rows: QuantizedRows, ids: np.ndarray) -> np.ndarray:
    """``logits`` (T, V) from a head whose kernel rounded its input to int8, with the entries ``ids`` (T, k: the
    head graph's top-k) replaced by the exact dot products of ``x`` (T, C, the head's float input) with those
    tokens' rows (read from the file). In place; returns ``logits``."""
    t, k = ids.shape
    w = rows.rows(ids).reshape(t, k, rows.width)
    exact = np.einsum("tkc,tc->tk", w, x.reshape(t, rows.width).astype(np.float32, copy=False))
    np.put_along_axis(logits, ids, exact.astype(logits.dtype, copy=False), axis=-1)
    return logits
