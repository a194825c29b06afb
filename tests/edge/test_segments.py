"""Composed segments (edge/segments.py): consecutive in-place block graphs run as one ONNX Runtime graph per
segment, cut where a split falls, with the same numbers as one session per block."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from seamline.edge.runtime import EdgeRuntime
from seamline.edge.segments import INLINE_BYTES, NotComposable, compose
from seamline.protos.bundle import BundleError


@pytest.fixture(scope="module", params=["fp32", "int4"])
def llama(request, cut_bundle):
    """A tiny Llama with every layer on the edge (in-place GQA block graphs), fp32 and int4 blocks."""
    options = {"quantize_edge": "int4"} if request.param == "int4" else {}
    return cut_bundle("llama", **options).path


def _hidden(rt: EdgeRuntime, cache, steps) -> list[np.ndarray]:
    """Run ``steps`` = [(ids, start, k)] or [("cont", start, k_from, k_to, rows)] through ``rt``."""
    return [rt.forward(ids, start, k, cache) for ids, start, k in steps]


def test_segments_equal_one_session_per_block_at_every_split_and_as_the_split_moves(llama):
    composed = EdgeRuntime(llama, verify=False)
    single = EdgeRuntime(llama, verify=False, compose=False)
    n = composed.num_edge_layers
    assert composed.composed and [(g.first, g.stop) for g in composed._runs] == [(0, n)]
    assert not single.composed and len(single._runs) == n
    prompt = list(range(100, 124))
    for k in (n, 2, 1, 3, n, 0):  # prefill, then decode steps, the split moving between generations
        ca, cb = composed.new_cache(), single.new_cache()
        got = [composed.forward(prompt, 0, k, ca)] + [composed.forward([5 + j], 24 + j, k, ca) for j in range(4)]
        want = [single.forward(prompt, 0, k, cb)] + [single.forward([5 + j], 24 + j, k, cb) for j in range(4)]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert ca.length(k) == cb.length(k) == (28 if k else 0)
    # each split that fell inside a segment cut it there, once; the segments still cover [0, n)
    assert [(g.first, g.stop) for g in composed._runs] == [(0, 1), (1, 2), (2, 3), (3, n)]


def test_local_fallback_continues_through_segments(llama):
    composed = EdgeRuntime(llama, verify=False)
    single = EdgeRuntime(llama, verify=False, compose=False)
    n = composed.num_edge_layers
    ca, cb = composed.new_cache(), single.new_cache()
    rows_a = composed.forward(list(range(50, 60)), 0, 1, ca)
    rows_b = single.forward(list(range(50, 60)), 0, 1, cb)
    np.testing.assert_array_equal(composed.continue_from(rows_a, 0, 1, n, ca), single.continue_from(rows_b, 0, 1, n, cb))
    np.testing.assert_array_equal(composed.forward([9], 10, n, ca), single.forward([9], 10, n, cb))  # caches agree
    with pytest.raises(ValueError, match="holds 11 positions, expected 10"):
        composed.continue_from(rows_a, 10, 1, n, ca)  # a wrong start is refused before anything runs


def test_a_composed_graph_carries_no_weights_of_its_own(llama):
    blocks = sorted((llama / "int4").glob("block_*.onnx")) or sorted(llama.glob("block_*.onnx"))
    seg = compose(blocks, 0)
    assert (seg.first, seg.stop) == (0, len(blocks))
    assert seg.folder == blocks[0].parent
    model = onnx.ModelProto.FromString(seg.model)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < INLINE_BYTES for t in model.graph.initializer)
    # a small constant equal in every block (the lengths each derives from position_ids) is held once
    small = [(t.data_type, tuple(t.dims), t.raw_data) for t in model.graph.initializer
             if t.data_location != onnx.TensorProto.EXTERNAL]
    per_block = [t for t in onnx.load(str(blocks[0])).graph.initializer if len(t.raw_data) < INLINE_BYTES]
    assert len(small) == len(set(small)) and len(small) < len(blocks) * len(per_block)
    for t in external[:20]:  # each reference reads the block's own bytes back
        ref = {e.key: e.value for e in t.external_data}
        block = int(t.name.split("/")[0][1:])
        assert ref["location"] == blocks[block].name
        original = {x.name: x for x in onnx.load(str(blocks[block])).graph.initializer}[t.name.split("/", 1)[1]]
        data = blocks[block].read_bytes()[int(ref["offset"]):int(ref["offset"]) + int(ref["length"])]
        assert data == original.raw_data


def test_blocks_that_cannot_be_composed_run_one_session_each(cut_bundle, tmp_path):
    gpt2 = EdgeRuntime(cut_bundle("gpt2").path, verify=False)  # torch-exported blocks: no in-place cache
    assert not gpt2.composed and [g.path.name for g in gpt2.blocks][:2] == ["block_00.onnx", "block_01.onnx"]
    with pytest.raises(NotComposable, match="in place"):
        compose(sorted(cut_bundle("gpt2").path.glob("block_*.onnx")), 0)
    with pytest.raises(RuntimeError, match="compose=False"):
        _ = EdgeRuntime(cut_bundle("llama").path, verify=False).blocks


def test_blocks_in_two_folders_are_not_composed(cut_bundle, tmp_path):
    src = sorted(cut_bundle("llama").path.glob("block_*.onnx"))
    other = tmp_path / "other"
    other.mkdir()
    moved = [src[0], shutil.copy(src[1], other / src[1].name)]
    with pytest.raises(NotComposable, match="not in"):
        compose(moved, 0)


def test_a_corrupt_block_file_fails_the_start_naming_it(cut_bundle, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(cut_bundle("llama").path, bad)
    block = bad / "block_02.onnx"
    data = block.read_bytes()
    block.write_bytes(b"\xff" * 64 + data[64:])  # the size the manifest says; not an ONNX model
    with pytest.raises(BundleError, match=r"block_02\.onnx: ONNX Runtime cannot load.*corrupt"):
        EdgeRuntime(bad, verify=False)


def test_prepare_loads_a_split_before_it_runs(llama):
    rt = EdgeRuntime(llama, verify=False)
    n = rt.num_edge_layers
    rt.prepare(0, n)  # the ends are always boundaries: nothing to load
    assert [(g.first, g.stop) for g in rt._runs] == [(0, n)]
    rt.prepare(2, 1)
    assert [(g.first, g.stop) for g in rt._runs] == [(0, 1), (1, 2), (2, n)]
    before = list(rt._runs)
    rt.forward([1, 2, 3], 0, 2, rt.new_cache())  # a split that is ready loads nothing
    assert rt._runs == before


def test_a_finished_generation_frees_its_kv_buffers(llama):
    """The graphs' I/O bindings hold the buffers last bound; a generation's end releases them (else one
    generation's cache stayed alive beside the next one's)."""
    import asyncio
    import weakref

    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig
    from seamline.edge.messages import GenerationRequest

    async def main():
        engine = build_engine(EdgeConfig(bundle=str(llama), cloud=[], verify=False, log_level="WARNING"))
        try:
            gen = engine.start(GenerationRequest(tuple(range(100, 120)), 6))
            buffers = []
            async for _ in gen.events():
                buffers = buffers or [weakref.ref(c.key) for c in gen.cache.layers if c is not None]
            await engine.worker.run(lambda: None)  # the release queued behind the last job has run
            assert buffers and all(ref() is None for ref in buffers)
            again = engine.start(GenerationRequest(tuple(range(100, 120)), 6))  # the next one binds anew
            assert [e.tokens[0].token_id async for e in again.events() if e.tokens] == gen.result().token_ids
        finally:
            await close_engine(engine)

    asyncio.run(main())


def test_a_reserved_cache_is_made_once_at_its_size(llama):
    """A generation reserves prompt + new tokens: the in-place buffers are made that size at once (no
    doubling copy), grow by doubling only past it, and hold the same numbers as an unreserved cache."""
    rt = EdgeRuntime(llama, verify=False)
    n = rt.num_edge_layers
    reserved, plain = rt.new_cache(reserve=100), rt.new_cache()
    a = rt.forward(list(range(1, 71)), 0, n, reserved)
    b = rt.forward(list(range(1, 71)), 0, n, plain)
    np.testing.assert_array_equal(a, b)
    assert {c.capacity for c in reserved.layers} == {100} and {c.capacity for c in plain.layers} == {128}
    first = reserved.layers[0].key
    for p in range(70, 100):
        rt.forward([p % 50 + 1], p, n, reserved)
    assert reserved.layers[0].key is first  # filled to its reserve without a new buffer
    rt.forward([3], 100, n, reserved)
    assert {c.capacity for c in reserved.layers} == {min(200, rt.manifest.max_positions)}  # doubled, capped
    assert reserved.length(n) == 101


def test_a_long_prompt_runs_in_chunks_with_the_same_numbers(llama, monkeypatch):
    """A prompt longer than PREFILL_CHUNK runs through the blocks a chunk at a time into the same caches (a
    lower activation peak): the hidden states, the caches and the next step equal one call's, at a split and
    on the local fallback (continue_from)."""
    import seamline.edge.runtime as runtime_module

    rt = EdgeRuntime(llama, verify=False)
    n = rt.num_edge_layers
    prompt = [int(i) for i in np.random.default_rng(0).integers(100, 1000, 300)]
    runs, calls = {}, []
    embed = rt.embed.run
    monkeypatch.setattr(rt.embed, "run", lambda **feeds: calls.append(feeds["input_ids"].shape[1]) or embed(**feeds))
    for chunk in (10**6, runtime_module.PREFILL_CHUNK, 7):
        monkeypatch.setattr(runtime_module, "PREFILL_CHUNK", chunk)
        c = rt.new_cache()
        calls.clear()
        rows = rt.forward(prompt, 0, 2, c)
        assert calls == [min(chunk, len(prompt) - a) for a in range(0, len(prompt), chunk)]  # chunked, in order
        top = rt.continue_from(rows, 0, 2, n, c)
        runs[chunk] = (rows, top, rt.forward([7], len(prompt), n, c), c.length(n))
        rt.release(c)
    one = runs[10**6]
    for chunk in (runtime_module.PREFILL_CHUNK, 7):
        for a, b in zip(runs[chunk][:3], one[:3]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert runs[chunk][3] == one[3] == len(prompt) + 1
