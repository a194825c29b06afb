"""Carry a GGUF file's own 4-bit blocks into the int4 and int8 edge graphs (``MatMulNBits``), unchanged.

A GGUF Q4_0 / Q4_1 tensor stores each row in blocks of 32 weights along K, with an fp16 scale ``d``
(and, Q4_1, an fp16 minimum ``m``): ``w = d * (q - 8)`` (Q4_0) or ``w = d * q + m`` (Q4_1).
ONNX Runtime's ``MatMulNBits`` computes ``w = (q - zp) * scale`` per block of 32 along K. Its fast CPU
kernels take integer zero points only: float zero points (``-m / d``, which is what a Q4_1 block would
need) run a fallback that is ~50x slower per call (SmolLM2's 576 x 1536, one row, one thread, ONNX Runtime
1.32: 3.2 ms against 0.063 ms). So the file's codes keep the zero point 8 and a Q4_1 block's rest is added
in float (:meth:`Q4Tensor.to_matmul_nbits`):

- Q4_0: scale = d, zero point 8: exact;
- Q4_1: scale = d, zero point 8, plus ``blocksum(x) @ O``: ``blocksum(x)`` the sums of x over each block of
  32 (a Reshape and a ReduceSum), ``O`` (blocks, N) the offsets ``m + 8 d``. Exact to float32
  rounding; a block with d == 0 is its offset alone.

At int4 the codes are packed two per byte; at int8 one per byte (the same weights, twice the bytes).
Only the nibble order differs: GGUF byte j holds weights j (low) and j + 16 (high) of its block,
``MatMulNBits`` byte j holds weights 2j (low) and 2j + 1 (high).

Which GGUF tensor is which graph weight is found by value, not by name: a block graph's MatMul
weight is the Hugging Face weight transposed, and the Hugging Face conversion permutes the rows of
llama's q/k projections (``reverse_permute``). Each row of the graph weight is looked up among the
dequantized rows of the layer's GGUF tensors (exact float32 equality, since the checkpoint was
dequantized from the same file with the same arithmetic); a weight all of whose rows are found in one
tensor takes that tensor's blocks in that row order. Anything else (K-quants, Q8_0 block tensors, float
tensors, a weight the lookup does not find) is left to the regular quantizer, with the reason recorded.

The LM head is carried too when the file stores it (``output.weight``, or the tied ``token_embd.weight``)
as Q8_0 (32 signed 8-bit weights and an fp16 scale ``d`` per block: ``w = d * q``) and the bundle's head is
8-bit (``--quant-head int8``): ``MatMulNBits`` with 8 bits stores ``u = q + 128`` with a zero point of 128 and
scale ``d``, so ``(u - 128) * d`` is the file's weight exactly (:func:`q8_head`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QK = 32  # weights per GGUF Q4_0/Q4_1 block
CARRIED_TYPES = ("Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


class GGUFBlocksError(ValueError):
    pass


def _fp16(raw: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of every block of ``raw`` (..., bytes per block), as float32."""
    return raw[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


@dataclass
class Q4Tensor:
    """One GGUF 4-bit tensor: N rows of K weights, as raw blocks (N, K // 32, bytes per block)."""

    name: str
    kind: str  # Q4_0 | Q4_1
    raw: np.ndarray  # uint8 (N, K // QK, 18 | 20)
    _rows: dict[bytes, int] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.raw.shape[1] * QK

    def fields(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """d (N, nb) float32, m (N, nb) float32 or None, q (N, nb, 32) uint8 in weight order."""
        d = _fp16(self.raw, 0)
        off = 2
        m = None
        if self.kind == "Q4_1":
            m = _fp16(self.raw, 2)
            off = 4
        qs = self.raw[..., off:off + QK // 2]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # weight j: low nibble of byte j, j+16: high
        return d, m, q

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, the same arithmetic as ``gguf.quants`` (and so as the converted checkpoint)."""
        d, m, q = self.fields()
        if m is None:
            w = d[..., None] * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
        else:
            w = d[..., None] * q.astype(np.float32) + m[..., None]
        return w.reshape(self.shape)

    def row_index(self) -> dict[bytes, int]:
        """Dequantized row (float32 bytes) -> row number, built once."""
        if self._rows is None:
            w = self.dequantize()
            self._rows = {w[i].tobytes(): i for i in range(w.shape[0])}
        return self._rows

    def to_matmul_nbits(self, rows: np.ndarray | None = None, bits: int = 4
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """MatMulNBits inputs for rows ``rows`` (default all), exact: B, scales ``d``, zero points and, for Q4_1,
        the block offsets (nb, N) float32 that the graph adds as ``blocksum(x) @ offsets``.

        The codes keep the file's zero point 8, so ``(q - 8) * d`` is centred on the block like the weights
        (what an int8 activation kernel multiplies) and a Q4_1 block's offset is ``m + 8 d``. At 4 bits: B
        (N, nb, 16) packed, scales (N * nb,), no zero point input (the operator's default 8); at 8 bits one
        code per byte: B (N, nb, 32), scales (N, nb), uint8 zero points 8 (N, nb)."""
        d, m, q = self.fields()
        if rows is not None:
            d, q = d[rows], q[rows]
            m = None if m is None else m[rows]
        offsets = None if m is None else np.ascontiguousarray((m + np.float32(8) * d).T, dtype=np.float32)
        if bits == 8:
            return (np.ascontiguousarray(q, dtype=np.uint8), d.astype(np.float32),
                    np.full(d.shape, 8, dtype=np.uint8), offsets)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        return packed, d.reshape(-1).astype(np.float32), None, offsets


@dataclass
class LayerBlocks:
    layer: int
    tensors: list[Q4Tensor] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # tensor name -> its type, not carried


class GGUFBlocks:
    """The 4-bit block tensors of a GGUF file, per layer (``blk.<i>.*``)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = Path(path)
        reader = GGUFReader(self.path, "r")
        self.layers: dict[int, LayerBlocks] = {}
        self.types: dict[str, int] = {}
        for t in reader.tensors:
            parts = t.name.split(".")
            if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit() or len(t.shape) != 2:
                continue
            kind = t.tensor_type.name
            self.types[kind] = self.types.get(kind, 0) + 1
            layer = self.layers.setdefault(int(parts[1]), LayerBlocks(int(parts[1])))
            if kind not in CARRIED_TYPES:
                layer.skipped[t.name] = kind
                continue
            data = np.asarray(t.data)
            n = data.shape[0]
            layer.tensors.append(Q4Tensor(t.name, kind, data.reshape(n, -1, _BLOCK_BYTES[kind])))

    def refusal(self, precision: str = "int4") -> str:
        """Why weights of this file are not carried (empty when every 2-D block tensor is Q4_0/Q4_1)."""
        other = {k: v for k, v in self.types.items() if k not in CARRIED_TYPES}
        if not other:
            return ""
        names = ", ".join(f"{k} x{v}" for k, v in sorted(other.items()))
        return (f"{self.path.name}: {names} block tensors are not Q4_0/Q4_1 (K-quants and other formats are not "
                f"carried over): those weights are re-quantized with round-to-nearest {precision} instead")

    def match(self, layer: int, weight_kn: np.ndarray) -> tuple[Q4Tensor, np.ndarray] | None:
        """The tensor of ``layer`` whose dequantized rows are the rows of ``weight_kn.T``, and the row order."""
        blocks = self.layers.get(layer)
        if blocks is None:
            return None
        target = np.ascontiguousarray(weight_kn.T, dtype=np.float32)
        for t in blocks.tensors:
            if t.shape != target.shape:
                continue
            index = t.row_index()
            rows = [index.get(r.tobytes()) for r in target]
            if all(r is not None for r in rows):
                return t, np.asarray(rows, dtype=np.int64)
        return None


_Q8_BLOCK_BYTES = 34  # fp16 d + 32 int8


@dataclass
class Q8Tensor:
    """A GGUF Q8_0 tensor: N rows of K weights as raw blocks (N, K // 32, 34)."""

    name: str
    raw: np.ndarray

    def fields(self) -> tuple[np.ndarray, np.ndarray]:
        """d (N, nb) float32, q (N, nb, 32) int8."""
        return _fp16(self.raw, 0), self.raw[..., 2:].copy().view(np.int8)

    def dequantize(self) -> np.ndarray:
        """(N, K) float32: ``d * q``, as ``gguf.quants`` computes it."""
        d, q = self.fields()
        return (d[..., None] * q.astype(np.float32)).reshape(self.raw.shape[0], -1)

    def to_matmul_nbits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """8-bit MatMulNBits inputs: B (N, nb, 32) uint8 (q + 128), scales (N, nb) float32, zero points (N, nb)
        uint8 (128)."""
        d, q = self.fields()
        u = (q.astype(np.int16) + 128).astype(np.uint8)
        return u, d, np.full(d.shape, 128, dtype=np.uint8)


def q8_head(path: str, weight_kn: np.ndarray) -> Q8Tensor | None:
    """The file's LM head (``output.weight``, else the tied ``token_embd.weight``) when it is Q8_0 and its
    dequantized rows are exactly the columns of ``weight_kn`` (K = hidden, N = vocab), in order."""
    from gguf import GGUFReader

    reader = GGUFReader(Path(path), "r")
    by_name = {t.name: t for t in reader.tensors}
    t = by_name.get("output.weight") or by_name.get("token_embd.weight")
    if t is None or t.tensor_type.name != "Q8_0":
        return None
    data = np.asarray(t.data)
    tensor = Q8Tensor(t.name, data.reshape(data.shape[0], -1, _Q8_BLOCK_BYTES))
    if tensor.raw.shape[0] != weight_kn.shape[1] or tensor.raw.shape[1] * QK != weight_kn.shape[0]:
        return None
    if not np.array_equal(tensor.dequantize(), np.ascontiguousarray(weight_kn.T, dtype=np.float32)):
        return None
    return tensor


@functools.lru_cache(maxsize=4)
def load(path: str) -> GGUFBlocks:
    """The blocks of the GGUF file ``path`` (read once per process; the file is memory-mapped)."""
    return GGUFBlocks(Path(path))
