"""A GGUF file's own Q4_0 / Q4_1 blocks carried into MatMulNBits (`partitioner/gguf_blocks.py`).

A small GGUF file is written with the `gguf` package (Q4_1 with a d == 0 block, Q4_0, and a K-quant
tensor); the carried MatMulNBits weights must reproduce the file's dequantized weights (the same
arithmetic as `gguf.quants.dequantize`, which the checkpoint conversion uses) to float32 rounding,
in ONNX Runtime too, whatever the row order of the graph's weight.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

K, N = 96, 40


def _q4(kind: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """Raw GGUF blocks (N, K // 32 * bytes) and their dequantized weights (N, K)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    w[3, :32] = 0.0          # a zero block (d == 0, m == 0)
    w[5, 32:64] = 0.0371     # a constant block: Q4_1 stores d == 0 and m != 0
    raw = gguf.quants.quantize(w, qtype)
    return raw, gguf.quants.dequantize(raw, qtype)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    deq = {}
    for kind, name in (("Q4_1", "blk.0.attn_q.weight"), ("Q4_0", "blk.0.ffn_up.weight")):
        raw, deq[name] = _q4(kind, rng)
        w.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    # a K-quant tensor (its bytes are not read): refused, its weight re-quantized
    kq = gguf.GGMLQuantizationType.Q6_K
    block, size = gguf.GGML_QUANT_SIZES[kq]
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((N, 256 // block * size), np.uint8), raw_dtype=kq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, deq


def _dequant_nbits(b, scales, zp, offsets, n, k, bits=4):
    """(N, K) of MatMulNBits inputs plus the carried Q4_1 offsets: (q - zp) * scale per block, + offset."""
    q = (np.stack([b & 0x0F, b >> 4], -1) if bits == 4 else b).reshape(n, k // 32, 32).astype(np.float32)
    zero = 8.0 if zp is None else zp.reshape(n, -1, 1).astype(np.float32)
    w = (q - zero) * scales.reshape(n, -1, 1)
    if offsets is not None:
        w = w + offsets.T[..., None]
    return w.reshape(n, k)


def test_blocks_reproduce_the_files_weights(gguf_file):
    from seamline.partitioner.gguf_blocks import GGUFBlocks

    path, deq = gguf_file
    blocks = GGUFBlocks(path)
    assert "Q6_K x1" in blocks.refusal() and "round-to-nearest int4" in blocks.refusal()
    assert "round-to-nearest int8" in blocks.refusal("int8")
    tensors = {t.name: t for t in blocks.layers[0].tensors}
    assert set(tensors) == {"blk.0.attn_q.weight", "blk.0.ffn_up.weight"}
    for name, t in tensors.items():
        np.testing.assert_array_equal(t.dequantize(), deq[name])  # bit-identical to gguf.quants
        for bits in (4, 8):
            b, scales, zp, offsets = t.to_matmul_nbits(bits=bits)
            assert (offsets is None) == (t.kind == "Q4_0") and (zp is None) == (bits == 4)
            assert b.dtype == np.uint8 and b.shape == (N, K // 32, 32 * bits // 8)
            if zp is not None:
                assert zp.dtype == np.uint8 and (zp == 8).all()  # integer zero points: the fast kernels
            got = _dequant_nbits(b, scales, zp, offsets, N, K, bits)
            np.testing.assert_allclose(got, deq[name], rtol=0, atol=1e-6)
    q1 = tensors["blk.0.attn_q.weight"]
    assert (q1.fields()[0] == 0).sum() >= 2  # the zero and the constant block (d == 0)
    np.testing.assert_allclose(_dequant_nbits(*q1.to_matmul_nbits(), N, K)[5, 32:64], 0.0371, atol=1e-4)


def _graph(weights: list[np.ndarray], lead: tuple = ("M",)):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(weights))]
    nodes.append(helper.make_node("Concat", [f"y{i}" for i in range(len(weights))], ["y"], axis=-1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_graph_weights_are_matched_by_value_and_run_in_onnxruntime(gguf_file, tmp_path):
    """Rows permuted like llama's q/k (HF conversion), transposed like the exported MatMul weights; a
    weight the file does not hold is re-quantized; ONNX Runtime computes x @ W.T of the file's weights."""
    import onnx
    import onnxruntime as ort
    from seamline.partitioner.quantize import QuantSpec, quantize_graph, weight_report

    path, deq = gguf_file
    rng = np.random.default_rng(1)
    perm = rng.permutation(N)
    w_q = deq["blk.0.attn_q.weight"][perm]  # HF rows in another order than the file's
    w_up = deq["blk.0.ffn_up.weight"]
    other = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_graph([w_q.T.copy(), w_up.T.copy(), other.T.copy()]), str(src))
    spec = QuantSpec("int4", accuracy_level=0, gguf=str(path))  # float compute: the weights alone are compared
    report = quantize_graph(src, dst, spec, layer=0)
    assert report["float_matmul_weights"] == 0 and report["gguf_carried"] == 2  # the two carried are packed
    manifest = spec.to_manifest()["gguf_blocks"]
    assert manifest["carried"] == 2 and manifest["requantized"] == 1 and "Q6_K" in manifest["note"]
    assert weight_report(dst)["matmul_nbits"] == 2
    x = rng.standard_normal((5, K)).astype(np.float32)
    y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y[:, :N], x @ w_q.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:, N:2 * N], x @ w_up.T, rtol=1e-5, atol=1e-5)
    assert np.abs(y[:, 2 * N:] - x @ other.T).max() > 1e-4  # the re-quantized one is only close
    # another layer of the file has nothing to carry: everything is re-quantized
    spec1 = QuantSpec("int4", gguf=str(path))
    assert "gguf_carried" not in quantize_graph(src, tmp_path / "q1.onnx", spec1, layer=1)
    assert spec1.to_manifest()["gguf_blocks"]["carried"] == 0
    # a block size other than the file's 32 is re-quantized (and says nothing about GGUF blocks)
    spec64 = QuantSpec("int4", block_size=64, gguf=str(path))
    quantize_graph(src, tmp_path / "q64.onnx", spec64, layer=0)
    assert not spec64.carries and "gguf_blocks" not in spec64.to_manifest()


@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("level", [0, 4])
def test_carried_blocks_keep_integer_zero_points(gguf_file, tmp_path, precision, level):
    """The file's codes with zero point 8 (4-bit packed, or one per byte at int8) and its scales; a Q4_1
    block's offset m + 8d added as block sums of x times the offsets. ONNX Runtime computes x @ W.T of the
    file's weights (float compute: to float32 rounding); two Q4_1 weights on one input are packed into one
    node whose offsets are added once, before the split; a weight the file does not hold is re-quantized
    round-to-nearest while the offsets' float MatMuls are left alone."""
    import onnx
    import onnxruntime as ort
    from seamline.partitioner.quantize import QuantSpec, quantize_graph, weight_report

    path, deq = gguf_file
    rng = np.random.default_rng(2)
    w_q = deq["blk.0.attn_q.weight"][rng.permutation(N)]
    w_q2 = deq["blk.0.attn_q.weight"][rng.permutation(N)]
    w_up = deq["blk.0.ffn_up.weight"]
    other = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    x = rng.standard_normal((2, 5, K)).astype(np.float32)  # rank 3, as in the block graphs

    def run(weights, name):
        src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}.q.onnx"
        onnx.save(_graph([w.T.copy() for w in weights], ("B", "M")), str(src))
        spec = QuantSpec(precision, accuracy_level=level, gguf=str(path))
        report = quantize_graph(src, dst, spec, layer=0)
        y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return report, spec, onnx.load(str(dst)), y

    tol = 1e-5 if level == 0 else 3e-2  # level 4: the kernel rounds x to int8 per block on the fly
    report, spec, model, y = run([w_q, w_q2], "two_q4_1")
    assert report["gguf_carried"] == 2 and report["float_matmul_weights"] == 0 and report["matmul_nbits"] == 1
    carried = spec.to_manifest()["gguf_blocks"]
    assert carried["carried"] == 2 and carried["requantized"] == 0
    assert f"round-to-nearest {precision}" in carried["note"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 1 and ops.count("Split") == 1  # offsets added once, before the split
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["bits"] == int(precision[3])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    if precision == "int8":
        assert inits[node.input[1]].max() <= 15 and (inits[node.input[3]] == 8).all()  # the 4-bit codes, a byte each
    else:
        assert len(node.input) == 3  # the default zero point 8: no float zero points (a slow fallback kernel)
    np.testing.assert_allclose(y[..., :N], x @ w_q.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(y[..., N:], x @ w_q2.T, rtol=tol, atol=tol)

    report, spec, model, y = run([w_q, w_up, other], "mixed")
    assert report["gguf_carried"] == 2 and report["float_matmul_weights"] == 0 and report["matmul_nbits"] >= 1
    assert spec.to_manifest()["gguf_blocks"]["requantized"] == 1
    inits = {t.name for t in model.graph.initializer}
    assert any(name.endswith("_block_offsets") for name in inits)  # still float: the quantizer left them
    np.testing.assert_allclose(y[..., :N], x @ w_q.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(y[..., N:2 * N], x @ w_up.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(y[..., 2 * N:], x @ other.T, rtol=0, atol=5e-2 if precision == "int8" else 0.3)
    assert weight_report(tmp_path / "mixed.q.onnx")["float_matmul_weights"] == 0


def test_partition_notes_say_what_the_carried_graphs_cost():
    from seamline.partitioner.partition import quantization_notes

    assert quantization_notes({}) == [] and quantization_notes({"precision": "int4", "accuracy_level": 4}) == []
    int4 = quantization_notes({"precision": "int4", "gguf_blocks": {"carried": 7, "accuracy_level": 0}})
    assert len(int4) == 1 and "--quant-accuracy-level 4" in int4[0]
    assert quantization_notes({"precision": "int4", "gguf_blocks": {"carried": 7, "accuracy_level": 4}}) == []
    assert quantization_notes({"precision": "int8", "gguf_blocks": {"carried": 0, "accuracy_level": 0}}) == []
    int8 = quantization_notes({"precision": "int8",
                               "gguf_blocks": {"carried": 7, "accuracy_level": 0, "note": "x.gguf: Q6_K x1 ..."}})
    assert int8[0].startswith("x.gguf") and "--quantize-edge int4" in int8[1]


def test_by_default_only_the_carried_blocks_run_with_float_activations(gguf_file, tmp_path):
    """No --quant-accuracy-level: the file's blocks at 0 (exact), a weight re-quantized from it at 4 (the default
    of every re-quantized weight), each MatMulNBits node with its own level; the manifest names the carried one."""
    import onnx
    from onnx import helper
    from seamline.partitioner.quantize import DEFAULT_ACCURACY_LEVEL, QuantSpec, quantize_graph

    path, deq = gguf_file
    other = np.random.default_rng(3).standard_normal((N, K)).astype(np.float32) * 0.05
    onnx.save(_graph([deq["blk.0.attn_q.weight"].T.copy(), other.T.copy()]), str(tmp_path / "f.onnx"))
    spec = QuantSpec("int4", gguf=str(path))
    assert (spec.accuracy_level, spec.carried_level) == (DEFAULT_ACCURACY_LEVEL, 0)
    quantize_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", spec, layer=0)
    levels = sorted({a.name: helper.get_attribute_value(a) for a in n.attribute}.get("accuracy_level", 0)
                    for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert levels == [0, DEFAULT_ACCURACY_LEVEL]
    manifest = spec.to_manifest()
    assert manifest["accuracy_level"] == DEFAULT_ACCURACY_LEVEL and manifest["gguf_blocks"]["accuracy_level"] == 0
    assert QuantSpec("int4", accuracy_level=4, gguf=str(path)).carried_level == 4  # asked: everything at 4
