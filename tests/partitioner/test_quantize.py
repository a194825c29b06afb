"""Weight-only quantized edge graphs (`partition --quantize-edge int4|int8`, `verify --quant`).

Bundles are cut for real: the tiny random Llama (every layer, int4 only: no fp32 block ships) and
the demo GPT-2 (two edge layers, int4 with --keep-fp32). The quantized bundle then loads in the
edge agent and generates on the local path (no cloud).
"""

from __future__ import annotations

import argparse
import json
import shutil

import httpx
import numpy as np
import pytest
from seamline.edge.config import EdgeConfig
from seamline.edge.runtime import EdgeRuntime
from seamline.partitioner.partition import PartitionError, PartitionOptions, partition
from seamline.partitioner.quantize import QuantSpec, quantize_graph, weight_report
from seamline.protos.bundle import BundleError, load_bundle
from seamline.testing.bundles import cached_cut, cached_partition
from seamline.testing.servers import AgentThread


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory, calibration_file, minilm_path):
    """A 2-layer random Llama (K = 80 and 136: not multiples of the block size 32), int4 only."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=30522, bos_token_id=101, eos_token_id=102, num_hidden_layers=2, hidden_size=80,
                         num_attention_heads=5, num_key_value_heads=1, intermediate_size=136,
                         max_position_embeddings=128)
    ckpt = tmp_path_factory.mktemp("llama2")
    tf.LlamaForCausalLM(cfg).save_pretrained(ckpt)
    shutil.copyfile(minilm_path / "tokenizer.json", ckpt / "tokenizer.json")
    return cached_partition("test-llama2-int4", ckpt, split=1, calibration=calibration_file, quantize_edge="int4")


@pytest.fixture(scope="module")
def demo_int4():
    return cached_cut("test-demo-int4", "demo", split=1, max_edge_layers=2, quantize_edge="int4", keep_fp32=True)


def test_blocks_are_matmul_nbits_and_no_fp32_copy_ships(llama_int4):
    manifest, summary, out = llama_int4
    assert manifest.precision == "int4" and manifest.precisions() == ["int4"]
    assert manifest.quantization["bits"] == 4 and manifest.quantization["block_size"] == 32
    for name in manifest.blocks:
        assert name.startswith("int4/")
        report = weight_report(out / name)
        assert report["matmul_nbits"] == 4, report  # q/k/v packed, o, gate/up packed, down
        assert report["float_matmul_weights"] == 0, report
    assert not list(out.glob("block_*.onnx"))  # the fp32 blocks were not kept
    assert summary["bytes_total"] == sum(p.stat().st_size for p in out.rglob("*")
                                         if p.is_file() and p.name != "manifest.json")
    with pytest.raises(BundleError, match="--keep-fp32"):
        EdgeRuntime(out, precision="fp32")


def test_manifest_hashes_cover_the_quantized_files(llama_int4, tmp_path):
    manifest, _, out = llama_int4
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest.files) == on_disk and {"int4/block_00.onnx", "int4/block_01.onnx"} <= on_disk
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    raw = bytearray((copy / "int4/block_01.onnx").read_bytes())
    raw[-10] ^= 0xFF
    (copy / "int4/block_01.onnx").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="block_01.onnx: sha256 mismatch"):
        load_bundle(copy)


def test_quantized_only_bundle_generates_on_the_local_path(llama_int4):
    _, _, out = llama_int4
    config = EdgeConfig(bundle=str(out), cloud=[], listen="127.0.0.1:0", log_level="WARNING", grace=2.0)
    agent = AgentThread(config).start()
    try:
        health = httpx.get(agent.url + "/healthz", timeout=10).json()
        assert health["precision"] == "int4"
        r = httpx.post(agent.url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 6,
                                                             "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        n = body["usage"]["completion_tokens"]
        assert 1 <= n <= 6 and body["seamline"]["served_by"] == {"cloud": 0, "local": n}
    finally:
        agent.stop()


def test_verify_quant_agreement_on_the_demo_model(demo_int4, tmp_path):
    from seamline.partitioner.cli import add_verify_arguments, run_verify

    m = load_bundle(demo_int4)
    assert m.precision == "int4" and m.precisions() == ["int4", "fp32"]
    p = argparse.ArgumentParser()
    add_verify_arguments(p)
    assert run_verify(p.parse_args([str(demo_int4), "--quant", "int4", "--json", str(tmp_path / "q.json")])) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["precision"] == "int4" and [r["split"] for r in report["splits"]] == [1, 2]
    assert report["greedy_agreement"] == min(r["greedy_agreement"] for r in report["splits"]) >= 0.9, report
    # --keep-fp32: the fp32 blocks ship too, and load by precision (their exact parity: test_parity.py)
    rt = EdgeRuntime(demo_int4, precision="fp32", verify=False)
    assert rt.precision == "fp32" and [g.path.name for g in rt.blocks] == ["block_00.onnx", "block_01.onnx"]


def test_hqq_symmetric_and_gemm_blocks(demo_int4, tmp_path):
    """GPT-2's Conv1D layers export as Gemm: rewritten to MatMul + bias, then quantized; HQQ (float zero
    points) and symmetric round-to-nearest (no zero points) run in ONNX Runtime and stay close to the fp32
    block."""
    import onnx

    src = demo_int4 / "block_00.onnx"
    dst = tmp_path / "hqq.onnx"
    report = quantize_graph(src, dst, QuantSpec("int4", "hqq"))
    assert report["matmul_nbits"] == 4 and report["float_matmul_weights"] == 0
    sym = tmp_path / "sym.onnx"
    spec = QuantSpec("int4", symmetric=True)
    assert quantize_graph(src, sym, spec)["matmul_nbits"] == 4 and spec.to_manifest()["symmetric"] is True
    assert all(len(n.input) == 3 for n in onnx.load(str(sym)).graph.node if n.op_type == "MatMulNBits")  # no zp
    rng = np.random.default_rng(0)
    past = np.zeros((1, 6, 0, 32), np.float32)
    feeds = {"hidden": rng.standard_normal((1, 3, 192)).astype(np.float32), "past_key": past, "past_value": past,
             "position_ids": np.arange(3).reshape(1, -1)}
    ref, got, got_sym = (_run(p, feeds) for p in (src, dst, sym))
    assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()
    assert np.abs(got_sym - ref).mean() < 0.05 * np.abs(ref).mean()


def _run(path, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize("kw, match", [
    ({"quantize_edge": "int8", "quant_method": "hqq"}, "hqq with int8"),
    ({"quantize_edge": "int4", "quant_block_size": 24}, "--quant-block-size 24"),
    ({"quantize_edge": "int4", "quant_method": "hqq", "quant_symmetric": True}, "--quant-symmetric applies to"),
])
def test_bad_quant_options_are_refused(tmp_path, kw, match):
    with pytest.raises(PartitionError, match=match):
        partition(PartitionOptions(model="demo", out=tmp_path / "b", **kw))


def test_the_lm_head_is_quantized_like_the_blocks(llama_int4):
    """The head of a weight-only bundle is a MatMulNBits graph (int8 by default), and only that copy ships."""
    import onnx

    manifest, _, out = llama_int4
    assert manifest.head == "int4/head.onnx" and manifest.quantization["head"] == "int8"
    assert not (out / "head.onnx").exists()
    model = onnx.load(str(out / manifest.head))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 1 and {a.name: a.i for a in nodes[0].attribute}["bits"] == 8
    assert weight_report(out / manifest.head)["float_matmul_weights"] == 0


def test_verify_judges_the_quantized_head_on_the_local_path(tmp_path):
    """A full int4 bundle of the demo model: `verify --quant int4` adds the local row (every layer and the
    int8 head in ONNX Runtime), which counts in the verdict; --quant-head none keeps the float head.
    (Int4 round-to-nearest blocks alone give the 6-layer demo ~0.89-0.95 agreement: the floor of `verify`
    is not what this test checks.)"""
    from seamline.partitioner.verify import VerifyOptions, verify

    full = cached_cut("test-demo-int4-full", "demo", split=3, quantize_edge="int4")
    m = load_bundle(full)
    assert m.head == "int4/head.onnx" and m.embed == "int4/embed.onnx"
    assert m.tied_embedding == "int4/tied_embedding.q.bin" and m.quantization["tied_embedding"] == "int8 (the head's)"
    assert not any(name.endswith((".onnx", ".bin")) and "/" not in name for name in m.files)  # no float graph or table
    report = verify(VerifyOptions(bundle=full, quant="int4", decode_steps=8))
    local, last = report["local"], report["splits"][-1]
    assert last["split"] == m.num_layers and local is not None, report
    # the same int4 blocks as split L, then the int8 head instead of torch's float one: it may cost a position
    assert local["greedy_agreement"] >= last["greedy_agreement"] - 0.05, report
    assert last["max_abs_logit_diff"] <= local["max_abs_logit_diff"] < 2.0, report
    assert report["greedy_agreement"] == min([r["greedy_agreement"] for r in report["splits"]]
                                             + [local["greedy_agreement"]])
    with pytest.raises(PartitionError, match="--quant-head int3"):
        partition(PartitionOptions(model="demo", out=tmp_path / "b", quantize_edge="int4", quant_head="int3"))
    float_head = cached_cut("test-demo-int4-float-head", "demo", split=3, max_edge_layers=6, quantize_edge="int4",
                            quant_head="none")
    fm = load_bundle(float_head)
    assert fm.head == "head.onnx" and fm.quantization["head"] == "float"
    assert weight_report(float_head / fm.head)["matmul_nbits"] == 0


@pytest.mark.parametrize("head_bits", [8, 4])
def test_the_embedding_reads_the_quantized_head_rows(head_bits):
    """A tied model's quantized head is stored once: the embedding graph gathers its rows (GatherBlockQuantized
    over the same file), so looking a token up gives exactly the head's dequantized column for it."""
    import onnx
    from onnx import helper, numpy_helper
    from seamline.protos.bundle import bundle_file

    full = cached_cut(f"test-demo-int4-q{head_bits}-head", "demo", split=3, quantize_edge="int4",
                      quant_head=f"int{head_bits}")
    m = load_bundle(full)
    assert m.tied_embedding == "int4/tied_embedding.q.bin"
    assert m.quantization["tied_embedding"] == f"int{head_bits} (the head's)"
    rt = EdgeRuntime(full)
    embed = onnx.load(str(full / m.embed), load_external_data=False)
    gbq = [n for n in embed.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and {a.name: helper.get_attribute_value(a) for a in gbq[0].attribute}["bits"] == head_bits
    head = onnx.load(str(full / m.head))
    mm = next(n for n in head.graph.node if n.op_type == "MatMulNBits")
    q, scales, zp = (numpy_helper.to_array(next(t for t in head.graph.initializer if t.name == name))
                     for name in mm.input[1:4])
    v, nb = scales.shape
    if head_bits == 4:  # two values per byte, low nibble first
        q = np.stack([q & 0x0F, q >> 4], -1).reshape(v, nb, -1)
        zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(v, -1)[:, :nb]
    table = ((q.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(v, -1)  # (V, C)
    ids = np.array([[0, 7, 300, m.vocab_size - 1]], np.int64)
    sess = rt.embed.session
    names = {i.name for i in sess.get_inputs()}
    feeds = {"input_ids": ids, "position_ids": np.zeros_like(ids)}  # position 0 for every row: the same wpe row
    got = sess.run(None, {k: x for k, x in feeds.items() if k in names})[0][0]
    wpe = got[0] - table[0]
    np.testing.assert_allclose(got - wpe, table[ids[0]], rtol=0, atol=1e-5)
    assert bundle_file(full, m.tied_embedding).stat().st_size < m.vocab_size * m.hidden_size * head_bits / 8 * 1.3

    # level 4 rounds the head's input to int8 on the fly; the edge recomputes its top logits from the same rows
    from seamline.partitioner.quantize import RESCORED
    from seamline.protos.bundle import HEAD_INPUT, RESCORE_META

    assert RESCORE_META in {e.key for e in head.metadata_props}
    assert [o.name for o in head.graph.output][1] == HEAD_INPUT
    hidden = np.random.default_rng(0).standard_normal((5, m.hidden_size)).astype(np.float32) * 3
    approx, xn, _ = rt.head.run(hidden=hidden[None])
    exact = xn[0] @ table.T
    got = rt.logits(hidden)
    assert np.abs(approx[0] - exact).max() > 1e-4  # the kernel's int8 input: not exact by itself
    top = np.argsort(-got, -1)[..., :RESCORED // 2]  # the last of the 16 may be one left approximate
    np.testing.assert_allclose(np.take_along_axis(got, top, -1), np.take_along_axis(exact, top, -1),
                               rtol=1e-5, atol=1e-5)
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_draft_heads_of_a_quantized_bundle_store_their_lm_head_in_fp16(llama_int4, tmp_path):
    """The draft heads' LM head file of a quantized bundle is fp16 (its tied table, if any, is quantized;
    the fp32 matrix would outweigh the int4 blocks)."""
    from seamline.partitioner.draft_head import LM_HEAD_FILE, shared_lm_head_file

    manifest, _, out = llama_int4
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    w = np.random.default_rng(0).standard_normal((manifest.vocab_size, manifest.hidden_size)).astype(np.float32)
    assert shared_lm_head_file(copy, manifest, w) == (LM_HEAD_FILE, True)
    stored = np.frombuffer((copy / LM_HEAD_FILE).read_bytes(), dtype="<f2").reshape(w.shape)
    np.testing.assert_array_equal(stored, w.astype(np.float16))


def _nbits_graph(rng, with_zp: dict[str, bool]):
    """MatMulNBits nodes q, k, v, w on input x (K = 80: a partial last block) and u on input y; q/k/v with
    integer zero points, w without (symmetric), as the quantizer writes them."""
    from onnx import TensorProto, helper, numpy_helper

    k, bs = 80, 32
    nb = -(-k // bs)
    sizes = {"q": 48, "k": 16, "v": 16, "w": 24, "u": 40}
    nodes, inits = [], []
    for name, n in sizes.items():
        inputs = ["y" if name == "u" else "x", f"{name}_B", f"{name}_s"]
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, nb, bs // 2), dtype=np.uint8), f"{name}_B"),
                  numpy_helper.from_array((rng.random((n, nb)) * 0.02).astype(np.float32), f"{name}_s")]
        if with_zp[name]:
            inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, -(-nb // 2)), dtype=np.uint8), f"{name}_z"))
            inputs.append(f"{name}_z")
        nodes.append(helper.make_node("MatMulNBits", inputs, [name], domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=bs, accuracy_level=4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, ["M", k]) for i in "xy"],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["M", sizes[o]]) for o in sizes],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def test_parallel_projections_are_packed_into_one_node_exactly():
    """q/k/v (same input, same settings) become one MatMulNBits and a Split; a node without zero points and a
    node on another input stay alone; every output is what the separate nodes computed, bit for bit."""
    import onnxruntime as ort
    from seamline.partitioner.quantize import pack_parallel_matmuls

    rng = np.random.default_rng(0)
    model = _nbits_graph(rng, {"q": True, "k": True, "v": True, "w": False, "u": True})
    packed = type(model)()
    packed.CopyFrom(model)
    assert pack_parallel_matmuls(packed) == 2
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 1, ops
    assert pack_parallel_matmuls(packed) == 0  # nothing left to pack
    assert not {"q_B", "k_B", "v_B", "q_z"} & {t.name for t in packed.graph.initializer}  # no copy left behind
    feeds = {i: rng.standard_normal((5, 80)).astype(np.float32) for i in "xy"}
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
                for m in (model, packed))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
