"""Weight-only quantization of the edge block graphs (``partition --quantize-edge int4|int8``).

Every MatMul (and bias Gemm, rewritten to MatMul + Add first) with a constant weight becomes an
ONNX Runtime ``MatMulNBits`` node (com.microsoft): the weight is stored in blocks of
``block_size`` values along K, 4 or 8 bits each, with one float scale (and zero point) per block;
activations stay float. The quantizer is onnxruntime's ``MatMulNBitsQuantizer``:

- ``rtn``: round-to-nearest, asymmetric blocks, integer zero points (``DefaultWeightOnlyQuantConfig``);
- ``hqq``: half-quadratic quantization (``HQQWeightOnlyQuantConfig``), data-free, float zero points.

GPTQ (the calibrated method of the same tool) needs Intel Neural Compressor, which this installation
does not ship; HQQ optimises the scales and zero points against the weights instead of data.

``accuracy_level`` is MatMulNBits' compute type for the activations: 0 = float (the default
here: activations stay float end to end), 4 = the kernel quantizes each block of the input row to
int8 on the fly (faster on CPUs with int8 dot products; block-wise, so outlier channels stay local).

A GGUF source (``--model FILE.gguf``) in Q4_0 / Q4_1 keeps its own blocks in the int4 and int8 graphs
(``gguf_blocks.py``): its codes and scales become MatMulNBits' with the zero point 8, a Q4_1 block's offset
added in float, so the weights are the file's weights exactly instead of a second rounding of them. Weights
the file does not hold in those formats (K-quants, Q8_0, ...) are quantized by ``method`` as above.

``int8-dynamic`` is the former scheme (``quantize_dynamic``: int8 weights per tensor and int8
activations per tensor, computed at run time); see README "Weight-only quantization" for where it
stands.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WEIGHT_ONLY = ("int4", "int8")
PRECISIONS = (*WEIGHT_ONLY, "int8-dynamic")
METHODS = ("rtn", "hqq")
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
# the float side of carried Q4_1 blocks (their block offsets): not weights left unquantized
OFFSET_SUFFIXES = ("_block_offsets",)


class QuantizeError(ValueError):
    pass


@dataclass
class QuantSpec:
    precision: str  # int4 | int8 | int8-dynamic
    method: str = "rtn"  # rtn | hqq (weight-only precisions)
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int | None = None  # None: DEFAULT_ACCURACY_LEVEL, and 0 for the carried GGUF blocks
    symmetric: bool = False  # rtn: blocks without zero points (w = scale * (q - 8) at 4 bits)
    gguf: str = ""  # int4/int8 from a GGUF file: carry its Q4_0/Q4_1 blocks over ("" = re-quantize everything)
    carried: dict = field(default_factory=dict, repr=False)  # filled by quantize_graph: counts and notes

    # the compute type of the blocks carried from ``gguf``: the level asked for, else 0 (float activations).
    # Their point is the file's weights exactly; measured on SmolLM2-135M's Q4_1 file, every layer on the edge,
    # level 4 (int8 activations per block of 32, on the fly) takes greedy agreement with the fp32 model from
    # 1.000 to 0.936 at the worst split: SmolLM2's outlier channels do not survive int8 activations. Weights
    # the file does not hold as Q4_0/Q4_1 are re-quantized and run at ``accuracy_level`` like any others.
    carried_level: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.carried_level = 0 if self.accuracy_level is None else self.accuracy_level
        if self.accuracy_level is None:
            self.accuracy_level = DEFAULT_ACCURACY_LEVEL

    def validate(self) -> QuantSpec:
        if self.precision not in PRECISIONS:
            raise QuantizeError(f"--quantize-edge {self.precision}: supported: {', '.join(PRECISIONS)}")
        if self.method not in METHODS:
            raise QuantizeError(f"--quant-method {self.method}: supported: {', '.join(METHODS)}")
        if self.method == "hqq" and self.symmetric:
            raise QuantizeError("--quant-symmetric applies to --quant-method rtn; hqq fits its own float zero points")
        if self.method == "hqq" and self.precision == "int8":
            raise QuantizeError("--quant-method hqq with int8: ONNX Runtime's CPU MatMulNBits has no 8-bit kernel "
                                "for HQQ's float zero points; use --quant-method rtn for int8")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise QuantizeError(f"--quant-block-size {bs}: must be a power of two >= 16 (MatMulNBits), e.g. 32")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizeError(f"--quant-accuracy-level {self.accuracy_level}: must be 0 (float), 1 (fp32), "
                                "2 (fp16), 3 (bf16) or 4 (int8 compute)")
        return self

    @property
    def bits(self) -> int:
        return 4 if self.precision == "int4" else 8

    def to_manifest(self) -> dict:
        import onnxruntime

        if self.precision == "int8-dynamic":
            return {"method": "dynamic", "bits": 8, "tool": f"onnxruntime {onnxruntime.__version__} quantize_dynamic"}
        out = {"precision": self.precision, "method": self.method, "block_size": self.block_size,
               "symmetric": self.symmetric,
               "accuracy_level": self.accuracy_level, "bits": self.bits, "op": "com.microsoft.MatMulNBits",
               "tool": f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer"}
        if self.gguf and self.carries:
            out["gguf_blocks"] = {"carried": self.carried.get("carried", 0), "accuracy_level": self.carried_level,
                                  "requantized": self.carried.get("requantized", 0),
                                  **({"note": self.carried["note"]} if self.carried.get("note") else {})}
        return out

    @property
    def carries_head(self) -> bool:
        """A GGUF file's Q8_0 LM head can be carried: an int8 head with the file's block size (32)."""
        from .gguf_blocks import QK

        return bool(self.gguf) and self.precision == "int8" and self.block_size == QK

    @property
    def carries(self) -> bool:
        """GGUF blocks are carried over: int4 or int8 from a GGUF file with the file's own block size (32)."""
        from .gguf_blocks import QK

        return bool(self.gguf) and self.precision in WEIGHT_ONLY and self.block_size == QK


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("onnxruntime.quantization")
    root = logging.getLogger()
    levels = (logger.level, root.level)
    logger.setLevel(logging.ERROR)
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(levels[0])
        root.setLevel(levels[1])


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, W, C) with a constant W (alpha = beta = 1, no transA) as MatMul(A, W') + Add(C).

    The torch exporter writes GPT-2's Conv1D layers as Gemm, which MatMulNBitsQuantizer skips.
    Returns the number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, done = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T.copy()
            inits[weight].CopyFrom(numpy_helper.from_array(w, weight))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name + "_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        done += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return done


def carry_gguf_blocks(model, spec: QuantSpec, layer: int) -> tuple[int, int]:
    """Replace each MatMul whose constant weight is a Q4_0/Q4_1 tensor of ``spec.gguf``'s layer ``layer``
    by a MatMulNBits node holding that tensor's codes (4-bit, or at int8 one per byte) with zero point 8, a Q4_1
    block's offset added by :func:`_add_block_offsets`. Returns (carried, MatMuls with a weight left)."""
    from onnx import helper, numpy_helper

    from . import gguf_blocks

    blocks = gguf_blocks.load(spec.gguf)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, carried, left, used, sums = [], 0, 0, set(), {}
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        t = inits.get(w_name)
        if t is None or len(t.dims) != 2 or t.data_type != 1:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(t)
        found = blocks.match(layer, w)
        if found is None:
            nodes.append(node)
            left += 1
            continue
        tensor, rows = found
        k, n = w.shape
        tag = f"Q{spec.bits}"
        b, scales, zp, mins = tensor.to_matmul_nbits(rows, spec.bits)
        names = [f"{w_name}_{tag}", f"{w_name}_scales"]
        graph.initializer.extend([numpy_helper.from_array(b, names[0]), numpy_helper.from_array(scales, names[1])])
        if zp is not None:
            names.append(f"{w_name}_zero_points")
            graph.initializer.append(numpy_helper.from_array(zp, names[2]))
        # the level always written (0 too): the quantizer's pass over the re-quantized rest adds its own level
        # to MatMulNBits nodes without one
        attrs = {"K": k, "N": n, "bits": spec.bits, "block_size": gguf_blocks.QK, "accuracy_level": spec.carried_level}
        out = node.output[0] if mins is None else f"{node.output[0]}_codes"
        before, after = ([], []) if mins is None else _add_block_offsets(graph, node.input[0], k, out, mins,
                                                                          node.output[0], sums)
        nodes.extend(before)
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], [out],
                                      name=(node.name or w_name) + f"_{tag}", domain="com.microsoft", **attrs))
        nodes.extend(after)
        used.add(w_name)
        carried += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    still = {i for nd in nodes for i in nd.input}
    keep = [t for t in graph.initializer if t.name not in used or t.name in still]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    if carried:
        _use_ms_domain(model)
    return carried, left


def _add_block_offsets(graph, x: str, k: int, codes: str, offsets: np.ndarray, out: str,
                       sums: dict) -> tuple[list, list]:
    """Nodes computing ``out = codes + blocksum(x) @ offsets``: a Q4_1 block's offset ``o`` adds ``o * sum(x
    over the block)`` to every output column. ``blocksum(x)`` (a Reshape to (..., K/32, 32) and a ReduceSum, once
    per input, shared through ``sums``: no constant, any rank of ``x``; a stored 0/1 (K, K/32) indicator grew
    as K^2/32 per input). ``offsets`` (K/32, N) float32, stored as ``<codes>_block_offsets``
    (also after packing: ``<packed output>_block_offsets``). Returns the nodes to put before the node computing
    ``codes`` (the block sums, once per input: ahead of a later packed node) and after."""
    from onnx import helper, numpy_helper

    from .gguf_blocks import QK

    before = []
    if x not in sums:  # x (..., K) -> (..., K/32, 32) -> summed over the last axis: no constant, any rank
        nb = k // QK
        sums[x] = f"{x}_blocksums"
        b = sums[x]
        graph.initializer.extend([numpy_helper.from_array(np.asarray([nb, QK], np.int64), f"{b}_block_shape"),
                                  numpy_helper.from_array(np.asarray([-1], np.int64), f"{b}_last_axis")])
        before += [helper.make_node("Shape", [x], [f"{b}_lead"], name=f"{b}_shape", end=-1),
                   helper.make_node("Concat", [f"{b}_lead", f"{b}_block_shape"], [f"{b}_shape_to"],
                                    name=f"{b}_concat", axis=0),
                   helper.make_node("Reshape", [x, f"{b}_shape_to"], [f"{b}_blocks"], name=f"{b}_reshape"),
                   helper.make_node("ReduceSum", [f"{b}_blocks", f"{b}_last_axis"], [b], name=f"{b}_sum",
                                    keepdims=0)]
    graph.initializer.append(numpy_helper.from_array(offsets, f"{codes}_block_offsets"))
    after = [helper.make_node("MatMul", [sums[x], f"{codes}_block_offsets"], [f"{codes}_offsets"],
                              name=f"{codes}_offsets_matmul"),
             helper.make_node("Add", [codes, f"{codes}_offsets"], [out], name=f"{out}_add_offsets")]
    return before, after


def pack_parallel_matmuls(model) -> int:
    """Merge the MatMulNBits nodes that read the same input with the same settings (a Llama block's q, k
    and v projections; its gate and up projections) into one node over the weights stacked along N,
    followed by a ``Split`` that gives every old output its columns. Returns the nodes saved.

    Exact: each output column of MatMulNBits depends only on its own weight column's blocks, scales and
    zero points, and those are stacked unchanged (row-wise along N); tested bit for bit. One kernel call
    over the stacked N does the work of two or three with one pass over the input row and one dispatch.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        inputs = list(node.input)
        if (node.op_type != "MatMulNBits" or len(inputs) not in (3, 4)
                or not all(i in inits for i in inputs[1:])):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - {"K", "N", "bits", "block_size", "accuracy_level"}:
            continue
        zp = inits[inputs[3]].data_type if len(inputs) == 4 else None
        key = (inputs[0], attrs["K"], attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0), zp,
               inits[inputs[2]].data_type, len(inits[inputs[2]].dims))
        groups.setdefault(key, []).append(node)
    saved, dropped, replace = 0, set(), {}
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
        sizes = [next(helper.get_attribute_value(a) for a in m.attribute if a.name == "N") for m in members]
        names = []
        for j in range(1, len(first.input)):
            parts = [numpy_helper.to_array(inits[m.input[j]]) for m in members]
            # row-major along N whatever the layout: B (N, blocks, bytes), scales and zero points (N, ...) or flat
            stacked = np.concatenate([a.reshape(n, -1) for a, n in zip(parts, sizes)])
            stacked = stacked.reshape(-1) if parts[0].ndim == 1 else stacked.reshape(-1, *parts[0].shape[1:])
            name = f"{first.input[j]}_packed"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(stacked), name))
            names.append(name)
            dropped.update(m.input[j] for m in members)
        out = f"{first.output[0]}_packed"
        split = f"{first.output[0]}_split_sizes"
        graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), split))
        base = first.name or first.output[0]
        packed = helper.make_node("MatMulNBits", [first.input[0], *names], [out], name=f"{base}_packed",
                                  domain="com.microsoft", **{**attrs, "N": int(sum(sizes))})
        cut = helper.make_node("Split", [out, split], [m.output[0] for m in members], name=f"{base}_split", axis=-1)
        replace[id(first)] = [packed, cut]
        replace.update({id(m): [] for m in members[1:]})
        saved += len(members) - 1
    if not saved:
        return 0
    nodes = [n for node in graph.node for n in replace.get(id(node), [node])]
    nodes = _offsets_before_split(nodes, graph, dropped)
    nodes = _attention_takes_packed_qkv(nodes, {o.name for o in graph.output}, dropped)
    graph.ClearField("node")
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in dropped]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    return saved


def _offsets_before_split(nodes: list, graph, dropped: set[str]) -> list:
    """A packed node whose every output part gets block offsets added (``Split`` -> ``Add(part, S @ M_i)``, the
    int8 form of Q4_1 blocks) gets them once before the split: ``Add(packed, S @ [M_1 | M_2 | ...])``, so the
    split's outputs are the finished projections again (and attention can read q/k/v packed). Exact: column
    for column the same sums."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    made = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gone, replace = set(), {}
    for split in nodes:
        if split.op_type != "Split" or not split.name.endswith("_split") or outputs & set(split.output):
            continue
        adds, mins, sums = [], [], set()
        for part in split.output:
            users = consumers.get(part, [])
            add = users[0] if len(users) == 1 else None
            if add is None or add.op_type != "Add" or add.input[0] != part:
                break
            mm = made.get(add.input[1])
            if (mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits
                    or not mm.input[1].endswith(OFFSET_SUFFIXES) or len(consumers.get(mm.output[0], [])) != 1):
                break
            adds.append(add)
            mins.append(mm)
            sums.add(mm.input[0])
        if len(adds) != len(split.output) or len(sums) != 1:
            continue
        stacked = np.concatenate([numpy_helper.to_array(inits[mm.input[1]]) for mm in mins], axis=1)
        base = split.input[0]
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(stacked), f"{base}_block_offsets"))
        dropped.update(mm.input[1] for mm in mins)
        fixed = [helper.make_node("MatMul", [sums.pop(), f"{base}_block_offsets"], [f"{base}_offsets"],
                                  name=f"{base}_offsets_matmul"),
                 helper.make_node("Add", [base, f"{base}_offsets"], [f"{base}_with_offsets"],
                                  name=f"{base}_add_offsets"),
                 helper.make_node("Split", [f"{base}_with_offsets", split.input[1]], [a.output[0] for a in adds],
                                  name=split.name, axis=-1)]
        replace[id(split)] = fixed
        gone.update(id(n) for n in (*adds, *mins))
    return [n for node in nodes if id(node) not in gone for n in replace.get(id(node), [node])]


def _attention_takes_packed_qkv(nodes: list, graph_outputs: set[str], dropped: set[str]) -> list:
    """GroupQueryAttention reads packed q/k/v itself (``query`` = [q | k | v], ``key`` and ``value`` empty):
    a Split whose three outputs are exactly that node's first three inputs, and nothing else's, goes."""
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gone = set()
    for split in nodes:
        outs = list(split.output)
        if split.op_type != "Split" or len(outs) != 3 or graph_outputs & set(outs):
            continue
        users = {id(u) for o in outs for u in consumers.get(o, [])}
        attn = consumers.get(outs[0], [None])[0]
        if (attn is None or attn.op_type != "GroupQueryAttention" or users != {id(attn)}
                or list(attn.input[:3]) != outs or any(len(consumers[o]) != 1 for o in outs)):
            continue
        attn.input[0], attn.input[1], attn.input[2] = split.input[0], "", ""
        gone.add(id(split))
        dropped.add(split.input[1])  # the split sizes
    return [n for n in nodes if id(n) not in gone]


def _use_ms_domain(model) -> None:
    """Import ONNX Runtime's com.microsoft operator set (MatMulNBits, GatherBlockQuantized) once."""
    from onnx import helper

    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _replace_node(graph, old, new) -> None:
    """Put ``new`` where ``old`` stands (the node order stays topological)."""
    at = list(graph.node).index(old)
    graph.node.remove(old)
    graph.node.insert(at, new)


def carry_gguf_head(model, spec: QuantSpec) -> str:
    """Replace the head's MatMul by an 8-bit MatMulNBits holding the GGUF file's Q8_0 LM head, when the file
    has one and it is this matrix (``gguf_blocks.q8_head``). Returns the tensor carried, or ""."""
    from onnx import helper, numpy_helper

    from . import gguf_blocks

    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits]
    if len(nodes) != 1 or len(inits[nodes[0].input[1]].dims) != 2:
        return ""
    node = nodes[0]
    w_name = node.input[1]
    w = numpy_helper.to_array(inits[w_name])
    tensor = gguf_blocks.q8_head(spec.gguf, w)
    if tensor is None:
        return ""
    b, scales, zp = tensor.to_matmul_nbits()
    names = [f"{w_name}_Q8", f"{w_name}_scales", f"{w_name}_zero_points"]
    model.graph.initializer.remove(inits[w_name])
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip((b, scales, zp), names))
    k, n = w.shape
    attrs = {"K": k, "N": n, "bits": 8, "block_size": gguf_blocks.QK}
    if spec.accuracy_level:
        attrs["accuracy_level"] = spec.accuracy_level
    _replace_node(model.graph, node, helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                                      name=(node.name or w_name) + "_Q8", domain="com.microsoft",
                                                      **attrs))
    _use_ms_domain(model)
    return tensor.name


def quantize_graph(src: Path, dst: Path, spec: QuantSpec, layer: int | None = None) -> dict:
    """Write the quantized copy of the graph ``src`` to ``dst``; returns counts for the summary.

    ``layer``: the decoder layer the block graph computes (for carrying ``spec.gguf``'s blocks over)."""
    spec.validate()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if spec.precision == "int8-dynamic":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet():  # DefaultTensorType: ONNX's shape inference has no schema for ORT's own norm operators
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return weight_report(dst)

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    gemm_to_matmul(model)
    carried = left = 0
    if spec.carries_head and layer is None:
        head = carry_gguf_head(model, spec)  # the LM head: the file's own Q8_0 blocks when it has them
        if head:
            spec.carried["head"] = head
            onnx.save(model, str(dst))  # one MatMul: nothing to pack
            return {**weight_report(dst), "gguf_carried": 1}
    if spec.carries and layer is not None:
        from . import gguf_blocks

        carried, left = carry_gguf_blocks(model, spec, layer)
        spec.carried["carried"] = spec.carried.get("carried", 0) + carried
        spec.carried["requantized"] = spec.carried.get("requantized", 0) + left
        note = gguf_blocks.load(spec.gguf).refusal(spec.precision)
        if note:
            spec.carried["note"] = note
        if not left:
            pack_parallel_matmuls(model)
            onnx.save(model, str(dst))
            return {**weight_report(dst), "gguf_carried": carried}
    if spec.method == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=spec.bits)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                              accuracy_level=spec.accuracy_level or None, bits=spec.bits)
    with _quiet():
        keep = [n.name for n in model.graph.node  # carried Q4_1 blocks' offsets: exact float, not weights
                if n.op_type == "MatMul" and any(i.endswith(OFFSET_SUFFIXES) for i in n.input)]
        quantizer = MatMulNBitsQuantizer(model, bits=spec.bits, block_size=spec.block_size,
                                         accuracy_level=spec.accuracy_level or None, nodes_to_exclude=keep,
                                         algo_config=config)
        quantizer.process()
    out = quantizer.model.model
    if spec.accuracy_level:  # HQQ does not write the attribute itself
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", spec.accuracy_level))
    pack_parallel_matmuls(out)
    onnx.save(out, str(dst))
    report = weight_report(dst)
    if report["float_matmul_weights"]:
        raise QuantizeError(f"{src}: {report['float_matmul_weights']} MatMul weights stayed float after "
                            f"quantization to {spec.precision}; the graph has a layout the quantizer skips")
    return {**report, "gguf_carried": carried} if carried else report


def weight_report(path: Path) -> dict:
    """MatMulNBits nodes, float MatMul/Gemm weights left (constant 2-D inputs) and bytes of ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nbits = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    floats = 0
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            for name in n.input[:2]:
                t = inits.get(name)
                if (t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
                        and not name.endswith(OFFSET_SUFFIXES)):
                    floats += 1
    return {"matmul_nbits": nbits, "float_matmul_weights": floats, "bytes": Path(path).stat().st_size}


def float_weight_bytes(path: Path) -> int:
    """Bytes of float32 initializers with at least 2 dimensions (weight matrices) in ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) * 4 for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2))


QUANT_TABLE_FILE = "tied_embedding.q.bin"  # next to the quantized graphs: the quantized LM head, read by embed too


RESCORED = 16  # the head's top logits the edge recomputes exactly (mark_head_rescoring)


def mark_head_rescoring(head, mm, layout: list[tuple[int, int]], dims: list[list[int]], block_size: int,
                        bits: int, top: int = RESCORED) -> None:
    """Let the edge make the head's ``top`` largest logits exact. At ``--quant-accuracy-level 4``
    ``MatMulNBits`` rounds the head's input to int8 per block of 32 on the fly (fast; SmolLM2's outlier
    channels come out of it with logits off by up to 0.5, enough to flip 1 greedy pick in 30). The head graph
    gets two more outputs, ``HEAD_INPUT`` (the float row it multiplies) and ``HEAD_TOP_IDS`` (its ``top``
    largest logits' ids), and metadata naming where the quantized rows are in the shared table file; the edge
    (``edge/table.py``, ``rescore_top``) reads the candidates' rows with ``pread`` (not through a mapping, whose pages would stay resident), takes
    the dot products in float and puts them in place of the approximate values. Gathering the rows inside
    the graph worked the same but left the mapped table's pages resident (+14 MB over 52 SmolLM2 tokens)."""
    import json

    from onnx import StringStringEntryProto, TensorProto, helper, numpy_helper
    from seamline.protos.bundle import HEAD_INPUT, HEAD_TOP_IDS, RESCORE_META

    head.graph.node.append(helper.make_node("Identity", [mm.input[0]], [HEAD_INPUT], name="head_input_out"))
    head.graph.output.append(helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, None))
    # the candidates: ONNX Runtime's TopK (0.07 ms over SmolLM2's 49152 logits; numpy's argpartition 0.27)
    head.graph.initializer.append(numpy_helper.from_array(np.asarray([top], np.int64), "head_top_k"))
    head.graph.node.append(helper.make_node("TopK", [mm.output[0], "head_top_k"], ["head_top_values", HEAD_TOP_IDS],
                                            name="head_top", axis=-1))
    head.graph.output.append(helper.make_tensor_value_info(HEAD_TOP_IDS, TensorProto.INT64, None))
    fields = dict(zip(("data", "scales", "zero_points"),
                      ([off, n // d[0]] for (off, n), d in zip(layout, dims))))
    meta = {"location": QUANT_TABLE_FILE, "vocab": dims[0][0], "width": dims[1][1] * block_size, "bits": bits,
            "block_size": block_size, **fields}  # how many to rescore: the TopK's own k, said once
    head.metadata_props.append(StringStringEntryProto(key=RESCORE_META, value=json.dumps(meta)))


def share_quantized_table(embed_src: Path, head_q: Path, embed_dst: Path) -> str | None:
    """Store a quantized LM head once, for the head and the embedding of a tied model.

    ``head_q``: the quantized head graph (one 4- or 8-bit ``MatMulNBits`` over the (C, V) matrix); ``embed_src``:
    the float embedding graph, whose ``Gather`` reads the same matrix as (V, C) rows. The head's quantized
    weight, scales and zero points move to one external-data file next to ``head_q``
    (:data:`QUANT_TABLE_FILE`), and ``embed_dst`` is the embedding graph with that ``Gather`` replaced by
    ``GatherBlockQuantized`` (com.microsoft) over the same bytes: the rows a token looks up are the head's
    rows, dequantized (block ``block_size`` along C, a scale and zero point per block). Nothing of the table
    stays float. The caller checks that the weights are tied. Returns the file's name, or None (nothing
    written) when the head is not one MatMulNBits with zero points over a (V, C) table the embedding gathers
    whose width is a whole number of blocks.
    """
    import onnx
    from onnx import helper, numpy_helper
    from seamline.protos.bundle import external_tensor

    head = onnx.load(str(head_q))
    embed = onnx.load(str(embed_src))
    nodes = [n for n in head.graph.node if n.op_type == "MatMulNBits"]
    if len(nodes) != 1:
        return None
    mm = nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
    e_inits = {t.name: t for t in embed.graph.initializer}
    gather = next((n for n in embed.graph.node if n.op_type == "Gather" and n.input[0] in e_inits
                   and list(e_inits[n.input[0]].dims) == [attrs["N"], attrs["K"]]), None)
    bits = attrs.get("bits")
    if bits not in (4, 8) or len(mm.input) < 4 or not mm.input[3] or gather is None:
        return None
    h_inits = {t.name: t for t in head.graph.initializer}
    # (V, nb, bs * bits / 8) u8, (V, nb) f32, (V, nb * bits / 8 rounded up) u8 (4-bit: two per byte)
    arrays = [numpy_helper.to_array(h_inits[name]) for name in mm.input[1:4]]
    v, nb, row = arrays[0].shape
    bs = int(attrs["block_size"])
    if (row * 8 != bs * bits or v * nb * bs != attrs["N"] * attrs["K"] or arrays[1].shape != (v, nb)
            or arrays[2].size != v * -(-nb * bits // 8)):
        return None
    layout, data, offset = [], bytearray(), 0
    for a in arrays:
        raw = np.ascontiguousarray(a).tobytes()
        layout.append((offset, len(raw)))
        data += raw + b"\0" * (-len(raw) % 64)  # 64-byte aligned pieces
        offset = len(data)
    Path(head_q).with_name(QUANT_TABLE_FILE).write_bytes(bytes(data))

    # the head: the same initializers, now read from the file
    for name, a, (off, n) in zip(mm.input[1:4], arrays, layout):
        t = h_inits[name]
        head.graph.initializer.remove(t)
        head.graph.initializer.append(external_tensor(name, t.data_type, list(t.dims), QUANT_TABLE_FILE, off, n))
    # the rows of the table as GatherBlockQuantized reads them: (V, C * bits / 8), (V, nb), (V, ...)
    u8, f32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    dims = [[v, nb * row], [v, nb], [v, arrays[2].size // v]]
    if (attrs.get("accuracy_level", 0) == 4 and len(mm.input) <= 4  # no bias: the node's output is x @ W
            and mm.output[0] in {o.name for o in head.graph.output}):  # and the logits, nothing after it
        mark_head_rescoring(head, mm, layout, dims, bs, bits, min(RESCORED, v))
    onnx.save(head, str(head_q))

    # the embedding: GatherBlockQuantized over the same bytes
    names = ["embed_q", "embed_q_scales", "embed_q_zero_points"]
    table = e_inits[gather.input[0]]
    embed.graph.initializer.remove(table)
    for name, dtype, d, (off, n) in zip(names, (u8, f32, u8), dims, layout):
        embed.graph.initializer.append(external_tensor(name, dtype, d, QUANT_TABLE_FILE, off, n))
    _replace_node(embed.graph, gather, helper.make_node(
        "GatherBlockQuantized", [names[0], gather.input[1], names[1], names[2]], list(gather.output),
        name="embed_tokens_q", domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=bs, bits=bits))
    _use_ms_domain(embed)
    Path(embed_dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(embed, str(embed_dst))
    return QUANT_TABLE_FILE
