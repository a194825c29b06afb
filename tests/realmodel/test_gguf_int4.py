"""SmolLM2's own Q4_1 blocks in the int4 and int8 edge graphs (``partitioner/gguf_blocks.py``).

The cached fp32 bundle's block graphs (EDGE_LAYERS layers) are quantized twice, carrying the GGUF
file's blocks and re-quantizing round-to-nearest, into two int4 bundles (the fp32 graphs ship along).
The carried weights must be the converted checkpoint's weights (q/k rows in Hugging Face order), and
``verify --quant int4`` must agree with the fp32 model at least as often as round-to-nearest does.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from .conftest import EDGE_LAYERS

# graph order of a llama block's MatMul weights
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def _int4_bundle(src, out, gguf: str, precision: str = "int4"):
    from seamline.partitioner.quantize import QuantSpec, quantize_graph
    from seamline.protos.bundle import GraphSet, load_bundle, write_manifest

    shutil.copytree(src, out)
    m = load_bundle(out, verify=False)
    spec = QuantSpec(precision, gguf=gguf)  # carried: float activations (accuracy level 0) unless asked
    for i, name in enumerate(m.blocks):
        quantize_graph(out / name, out / precision / name, spec, layer=i)
    m = dataclasses.replace(m, blocks=[f"{precision}/{b}" for b in m.blocks], precision=precision,
                            quantization=spec.to_manifest(),
                            variants={"fp32": GraphSet(m.embed, list(m.blocks), m.head)})
    write_manifest(m, out)
    return out, spec


@pytest.fixture(scope="module")
def int4_bundles(smol_gguf, smol_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-int4")
    carried = _int4_bundle(smol_bundle, root / "gguf", str(smol_gguf))
    rtn = _int4_bundle(smol_bundle, root / "rtn", "")
    return carried, rtn


def _dequantized(model, node):
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]])
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1, 1)
    zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1, 1) if len(node.input) > 3 else 8.0
    q = np.stack([packed & 0x0F, packed >> 4], -1) if attrs["bits"] == 4 else packed
    w = (q.reshape(n, k // bs, bs).astype(np.float32) - zp) * scales
    offsets = inits.get(f"{node.output[0]}_block_offsets")  # a Q4_1 block's m + 8d, added in float
    if offsets is not None:
        w = w + numpy_helper.to_array(offsets).T[..., None]
    return w.reshape(n, k)


def test_carried_blocks_are_the_checkpoints_weights(int4_bundles, smol_checkpoint):
    import onnx
    from safetensors.numpy import load_file
    from seamline.partitioner.quantize import weight_report

    (out, spec), _ = int4_bundles
    assert spec.to_manifest()["gguf_blocks"] == {"carried": 7 * EDGE_LAYERS, "accuracy_level": 0, "requantized": 0}
    weights = load_file(str(smol_checkpoint / "model.safetensors"))
    for i in range(EDGE_LAYERS):
        model = onnx.load(str(out / "int4" / f"block_{i:02d}.onnx"))
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 4  # q/k/v packed into one node, o, gate/up packed, down
        assert all(len(n.input) == 3 for n in nodes)  # the default zero point 8, not float ones (a slow kernel)
        assert weight_report(out / "int4" / f"block_{i:02d}.onnx")["float_matmul_weights"] == 0
        # a packed node's rows are its projections' rows stacked in graph order
        hf = [weights[f"model.layers.{i}.{proj}.weight"] for proj in PROJ]  # (out, in), q/k rows permuted
        for node in nodes:
            got = _dequantized(model, node)
            parts = []
            while sum(len(p) for p in parts) < len(got):
                parts.append(hf.pop(0))
            np.testing.assert_allclose(got, np.concatenate(parts), rtol=0, atol=1e-6, err_msg=f"layer {i}")
        assert not hf


def test_verify_int4_from_gguf_agrees_at_least_like_round_to_nearest(int4_bundles, smol_gguf):
    from seamline.partitioner.verify import VerifyOptions, verify

    (carried, _), (rtn, _) = int4_bundles
    import torch

    kw = {"model": str(smol_gguf), "quant": "int4", "prompt_tokens": 16, "decode_steps": 8}  # 24 positions
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torch half is small; one thread keeps a busy machine from thrashing it
    try:
        got = verify(VerifyOptions(bundle=carried, **kw))
        ref = verify(VerifyOptions(bundle=rtn, **kw))
    finally:
        torch.set_num_threads(threads)
    assert got["quantization"]["gguf_blocks"]["carried"] == 7 * EDGE_LAYERS
    assert [r["split"] for r in got["splits"]] == list(range(1, EDGE_LAYERS + 1))
    assert got["greedy_agreement"] >= ref["greedy_agreement"], (got["splits"], ref["splits"])
    assert got["greedy_agreement"] >= 0.99 and got["passed"], got["splits"]
    assert got["max_abs_logit_diff"] < ref["max_abs_logit_diff"]


def test_int8_from_gguf_carries_the_same_weights_exactly(smol_gguf, smol_bundle, tmp_path):
    """int8 from the Q4_1 file: the file's codes one per byte, zero point 8, the blocks' offsets added in float
    (ONNX Runtime's 8-bit kernel takes no float zero points): the weights are the checkpoint's, and verify
    agrees with the fp32 model at every split like fp32 parity does."""
    from seamline.partitioner.verify import VerifyOptions, verify

    out, spec = _int4_bundle(smol_bundle, tmp_path / "int8", str(smol_gguf), "int8")
    assert spec.carried_level == 0 and spec.to_manifest()["gguf_blocks"] == {
        "carried": 7 * EDGE_LAYERS, "accuracy_level": 0, "requantized": 0}
    got = verify(VerifyOptions(bundle=out, model=str(smol_gguf), quant="int8", prompt_tokens=16, decode_steps=8))
    assert [r["split"] for r in got["splits"]] == list(range(1, EDGE_LAYERS + 1))
    assert got["greedy_agreement"] == 1.0 and got["max_abs_logit_diff"] < 1e-3, got["splits"]


def test_the_q8_0_lm_head_is_carried_exactly(smol_gguf, smol_model, tmp_path):
    """SmolLM2's GGUF file holds its (tied) LM head as Q8_0: an int8 head graph carries those blocks, so the
    head's weights are the checkpoint's exactly, and the embedding that shares them gathers exact rows."""
    from onnx import helper, load, numpy_helper
    from seamline.partitioner import export
    from seamline.partitioner.families import adapter_for
    from seamline.partitioner.quantize import QuantSpec, quantize_graph, share_quantized_table

    model, _ = smol_model
    adapter = adapter_for(model)
    export.export_head(adapter, tmp_path / "head.onnx")
    export.export_embed(adapter, tmp_path / "embed.onnx")
    spec = QuantSpec("int8", gguf=str(smol_gguf))
    report = quantize_graph(tmp_path / "head.onnx", tmp_path / "q" / "head.onnx", spec)
    assert report["gguf_carried"] == 1 and spec.carried["head"] == "token_embd.weight", report
    assert share_quantized_table(tmp_path / "embed.onnx", tmp_path / "q" / "head.onnx", tmp_path / "q" / "embed.onnx")
    head = load(str(tmp_path / "q" / "head.onnx"))
    mm = next(n for n in head.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: helper.get_attribute_value(a) for a in mm.attribute}["bits"] == 8
    inits = {t.name: numpy_helper.to_array(t) for t in head.graph.initializer}
    u, scales, zp = (inits[name] for name in mm.input[1:4])
    w = ((u.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(u.shape[0], -1)  # (V, C)
    ref = model.get_output_embeddings().weight.detach().float().numpy()
    np.testing.assert_array_equal(w, ref)
