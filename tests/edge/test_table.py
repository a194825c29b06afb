"""The quantized token table read row by row from its file (`edge/table.py`).

A tied tiny Llama cut with ``--quantize-edge int4`` stores its table once, quantized, next to the int4
graphs; the runtime reads the rows the prompt needs with ``os.pread`` instead of running the embedding
graph (one GatherBlockQuantized over a mapped file). The rows must be what ONNX Runtime's operator gives,
bit for bit, for every token, at 8 and 4 bits, with and without zero points; bad ids and a damaged file
fail with clear errors.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from seamline.edge.runtime import EdgeRuntime, _Graph
from seamline.edge.table import QuantizedRows
from seamline.protos.bundle import BundleError
from seamline.testing.bundles import cached_partition
from seamline.testing.models import TINY_CONFIGS, minilm_dir, random_checkpoint

SCHEMES = {"int8 head": {"quant_head": "int8"}, "int4 head": {"quant_head": "int4"}}


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    config = {"vocab_size": 30522, "bos_token_id": 101, "eos_token_id": 102, **TINY_CONFIGS["llama"],
              "hidden_size": 64, "num_attention_heads": 4, "tie_word_embeddings": True}  # 64: two blocks of 32
    return random_checkpoint("llama", tmp_path_factory.mktemp("tied-llama"), seed=3, config=config,
                             tokenizer=minilm_dir() / "tokenizer.json")


@pytest.fixture(scope="module", params=list(SCHEMES))
def bundle(request, tied_llama, calibration_file):
    options = SCHEMES[request.param]
    name = "test-tied-llama-int4-" + request.param.replace(" ", "-")
    manifest, _, out = cached_partition(name, tied_llama, calibration=calibration_file, quantize_edge="int4",
                                        **options)
    assert manifest.tied_embedding == "int4/tied_embedding.q.bin"
    return manifest, out


def test_rows_are_the_operators_rows_for_every_token(bundle):
    manifest, out = bundle
    rt = EdgeRuntime(out, verify=False)
    assert isinstance(rt.embed, QuantizedRows)  # the runtime reads the file, no embedding session
    ort_embed = _Graph(out / manifest.embed, 1)
    ids = np.arange(manifest.vocab_size, dtype=np.int64).reshape(1, -1)
    (want,) = ort_embed.run(input_ids=ids, position_ids=np.zeros_like(ids))
    (got,) = rt.embed.run(input_ids=ids)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # and a whole forward pass is the same with either embedding
    other = EdgeRuntime(out, verify=False)
    other.embed = ort_embed
    prompt = [101, 2023, 2003, 1037, 3231, 102]
    a, b = rt.new_cache(), other.new_cache()
    np.testing.assert_array_equal(rt.forward(prompt, 0, manifest.num_layers, a),
                                  other.forward(prompt, 0, manifest.num_layers, b))


def test_an_id_outside_the_table_is_refused(bundle):
    _, out = bundle
    rt = EdgeRuntime(out, verify=False)
    with pytest.raises(ValueError, match=r"token id 30522 is outside the embedding table \(0\.\.30521\)"):
        rt.embed.rows(np.array([5, 30522]))
    with pytest.raises(ValueError, match="token id -1"):
        rt.embed.rows(np.array([-1]))


def test_a_truncated_table_fails_the_start_naming_the_file(bundle, tmp_path):
    manifest, out = bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    table = copy / manifest.tied_embedding
    table.write_bytes(table.read_bytes()[:1000])
    with pytest.raises(BundleError, match="tied_embedding.q.bin"):
        EdgeRuntime(copy, verify=False)


def test_a_table_without_zero_points_takes_the_operators_default(tmp_path):
    """GatherBlockQuantized without zero points: 8 (4 bits) or 128 (8 bits), as ONNX Runtime assumes."""
    import onnx
    from onnx import TensorProto, helper
    from seamline.protos.bundle import external_tensor

    rng = np.random.default_rng(0)
    vocab, width, bs = 50, 64, 32
    for bits in (4, 8):
        q = rng.integers(0, 256, (vocab, width * bits // 8), dtype=np.uint8)
        scales = (rng.random((vocab, width // bs)) * 0.1).astype(np.float32)
        (tmp_path / "t.bin").write_bytes(q.tobytes() + scales.tobytes())
        inits = [external_tensor("q", TensorProto.UINT8, list(q.shape), "t.bin", 0, q.nbytes),
                 external_tensor("s", TensorProto.FLOAT, list(scales.shape), "t.bin", q.nbytes, scales.nbytes)]
        node = helper.make_node("GatherBlockQuantized", ["q", "input_ids", "s"], ["hidden"], domain="com.microsoft",
                                gather_axis=0, quantize_axis=1, block_size=bs, bits=bits)
        graph = helper.make_graph([node], "e", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"])],
                                  [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "T", width])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                        helper.make_opsetid("com.microsoft", 1)])
        onnx.save(model, str(tmp_path / "embed.onnx"))
        table = QuantizedRows.of(tmp_path / "embed.onnx")
        assert table is not None and table.zero_points is None
        ids = np.arange(vocab, dtype=np.int64).reshape(1, -1)
        (want,) = _Graph(tmp_path / "embed.onnx", 1).run(input_ids=ids)
        np.testing.assert_array_equal(table.run(input_ids=ids)[0], want)
        table.close()


def test_the_level4_heads_top_logits_are_read_exactly(bundle):
    """The head's rows, read from the file by the rescoring metadata, are the embedding's rows (the same table),
    and the runtime's logits equal the float dot products at their top: the int8 head and the int4 head."""
    import json

    from seamline.protos.bundle import RESCORE_META

    manifest, out = bundle
    rt = EdgeRuntime(out, verify=False)
    rows = rt._head_rows
    assert rows.path == rt.embed.path
    ids = np.array([0, 7, 300, manifest.vocab_size - 1])
    np.testing.assert_array_equal(rows.rows(ids), rt.embed.rows(ids))
    hidden = np.random.default_rng(1).standard_normal((3, manifest.hidden_size)).astype(np.float32) * 4
    _, x, top = rt.head.run(hidden=hidden[None])
    assert top.shape == (1, 3, 16)  # the 16 candidates the graph's TopK picks
    exact = x[0] @ rt.embed.rows(np.arange(manifest.vocab_size)).T
    got = rt.logits(hidden)
    best = np.argsort(-got, -1)[:, :8]
    np.testing.assert_allclose(np.take_along_axis(got, best, -1), np.take_along_axis(exact, best, -1),
                               rtol=1e-5, atol=1e-5)
    # metadata that does not fit the file is refused at load, naming the graph
    meta = json.loads(rt.head.meta[RESCORE_META])
    for bad in ({**meta, "vocab": meta["vocab"] * 100}, {**meta, "data": [0, 3]}, {"top": 16}):
        with pytest.raises(ValueError, match="rescoring metadata"):
            QuantizedRows.of_head(json.dumps(bad), lambda loc: out / "int4" / loc)
    with pytest.raises(ValueError, match="malformed"):
        QuantizedRows.of_head("{not json", lambda loc: out / "int4" / loc)
