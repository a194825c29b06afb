"""ONNX export of the edge segments: embeddings, one graph per block, and the head.

Each graph is exported with torch's dynamo exporter from a small wrapper around the family
adapter (so the graph computes exactly what the cloud computes in torch), checked with
``onnx.checker``, except the blocks a family builds itself around ONNX Runtime's fused operators
(``FamilyAdapter.block_graph``), each checked against the adapter's block with ONNX Runtime;
``quantize.py`` writes the weight-only quantized copies of the blocks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from seamline.protos.bundle import external_tensor

from .families import FamilyAdapter

# Example sizes for tracing: the dynamo exporter specialises sizes 0 and 1, so trace with >= 2
# and declare the minimum of the dynamic dimension.
_EX_T, _EX_P = 3, 4
DEFAULT_OPSET = 18
log = logging.getLogger("seamline.partitioner.export")


class _Embed(torch.nn.Module):
    def __init__(self, adapter: FamilyAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, input_ids, position_ids):
        return self.adapter.embed(input_ids, position_ids)


class _DecoderBlock(torch.nn.Module):
    def __init__(self, adapter: FamilyAdapter, i: int):
        super().__init__()
        self.adapter, self.i = adapter, i

    def forward(self, hidden, past_key, past_value, position_ids):
        return self.adapter.block(self.i, hidden, past_key, past_value, position_ids)


class _EncoderBlock(torch.nn.Module):
    def __init__(self, adapter: FamilyAdapter, i: int):
        super().__init__()
        self.adapter, self.i = adapter, i

    def forward(self, hidden, attention_mask):
        return self.adapter.block(self.i, hidden, None, None, None, attention_mask)[0]


class _Head(torch.nn.Module):
    def __init__(self, adapter: FamilyAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, hidden):
        return self.adapter.head(hidden)


class _EncoderHead(torch.nn.Module):
    def __init__(self, adapter: FamilyAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, hidden, attention_mask):
        return self.adapter.head(hidden, attention_mask)


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warnings per graph; keep our own progress bar clean."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
            output_names: list[str], dynamic_shapes: dict, opset: int) -> None:
    import onnx

    module.eval()  # the exporter restores the wrapper's mode afterwards: keep it eval
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes, opset_version=opset,
                          external_data=False, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)


def export_embed(adapter: FamilyAdapter, path: Path, opset: int = DEFAULT_OPSET) -> None:
    t = torch.export.Dim("T", min=1, max=max(2, adapter.shape.max_positions))
    ids = torch.zeros(1, _EX_T, dtype=torch.long)
    pos = torch.arange(_EX_T).unsqueeze(0)
    _export(_Embed(adapter), (ids, pos), path, ["input_ids", "position_ids"], ["hidden"],
            {"input_ids": {1: t}, "position_ids": {1: t}}, opset)


def export_block(adapter: FamilyAdapter, i: int, path: Path, opset: int = DEFAULT_OPSET) -> None:
    s = adapter.shape
    t = torch.export.Dim("T", min=1, max=max(2, s.max_positions))
    hidden = torch.randn(1, _EX_T, s.hidden_size)
    if s.causal:
        p = torch.export.Dim("P", min=0, max=max(2, s.max_positions))
        past = torch.randn(1, s.num_kv_heads, _EX_P, s.head_dim)
        pos = torch.arange(_EX_P, _EX_P + _EX_T).unsqueeze(0)
        _export(_DecoderBlock(adapter, i), (hidden, past, past.clone(), pos), path,
                ["hidden", "past_key", "past_value", "position_ids"],
                ["hidden_out", "present_key", "present_value"],
                {"hidden": {1: t}, "past_key": {2: p}, "past_value": {2: p}, "position_ids": {1: t}}, opset)
    else:
        mask = torch.ones(1, _EX_T, dtype=torch.long)
        _export(_EncoderBlock(adapter, i), (hidden, mask), path, ["hidden", "attention_mask"], ["hidden_out"],
                {"hidden": {1: t}, "attention_mask": {1: t}}, opset)


def _block_inputs(adapter: FamilyAdapter, t: int = 5, p: int = 3) -> dict[str, torch.Tensor]:
    """Random inputs of one block call (``p`` cached positions, ``t`` new ones), by graph input name."""
    s = adapter.shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, t, s.hidden_size, generator=g)
    if not s.causal:
        return {"hidden": hidden, "attention_mask": torch.ones(1, t, dtype=torch.long)}
    past = torch.randn(2, 1, s.num_kv_heads, p, s.head_dim, generator=g)
    return {"hidden": hidden, "past_key": past[0], "past_value": past[1],
            "position_ids": torch.arange(p, p + t).unsqueeze(0)}


# (new, cached) positions a graph is checked at: a prefill chunk after a cached part; a hand-built graph
# also a first chunk and a decode step, the paths a fused attention operator takes separately
SWAP_CHECK = ((5, 3),)
BUILT_CHECK = ((5, 3), (4, 0), (1, 7))


def _block_matches_torch(adapter: FamilyAdapter, i: int, path: Path, tol: float = 1e-4,
                         shapes: tuple[tuple[int, int], ...] = SWAP_CHECK) -> bool:
    """Does the graph at ``path`` compute block i of the model (ONNX Runtime against the adapter)?"""
    import numpy as np
    import onnxruntime as ort
    from seamline.edge.runtime import rope_tables

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    tables = rope_tables(sess.get_modelmeta().custom_metadata_map, max(t + p for t, p in shapes))
    for t, p in shapes if adapter.shape.causal else shapes[:1]:
        feeds = _block_inputs(adapter, t, p)
        with torch.no_grad():
            if adapter.shape.causal:
                want = adapter.block(i, feeds["hidden"], feeds["past_key"], feeds["past_value"],
                                     feeds["position_ids"])
            else:
                want = (adapter.block(i, feeds["hidden"], None, None, None, feeds["attention_mask"])[0],)
        got = sess.run(None, {**{k: v.numpy() for k, v in feeds.items()}, **tables})
        if not all(np.allclose(g, w.numpy(), rtol=tol, atol=tol * max(1.0, float(w.abs().max())))
                   for g, w in zip(got, want, strict=True)):
            return False
    return True


def _weight_sources(graph, layer: torch.nn.Module) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (parameter name in ``layer``, transposed) for the graph's initializers that hold
    one of ``layer``'s float weights as is or transposed (the exporter folds a Linear's transpose)."""
    import numpy as np
    from onnx import numpy_helper

    params = {n: p.detach().float().numpy() for n, p in layer.named_parameters()}
    out: dict[str, tuple[str, bool]] = {}
    for init in graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype != np.float32 or a.ndim == 0 or a.size < 2:
            continue
        for name, w in params.items():
            if w.shape == a.shape and np.array_equal(w, a):
                out[init.name] = (name, False)
                break
            if w.ndim == 2 and w.shape[::-1] == a.shape and np.array_equal(w.T, a):
                out[init.name] = (name, True)
                break
    return out


def export_blocks(adapter: FamilyAdapter, paths: list[Path], opset: int = DEFAULT_OPSET,
                  progress: Callable[[int, bool], None] | None = None) -> int:
    """Blocks 0..n-1 to ``paths``; returns how many went through the exporter.

    A family that builds its block graph itself (``FamilyAdapter.block_graph``: the Llama family, around
    ONNX Runtime's fused attention) gets that graph for every block, each kept only when ONNX Runtime
    computes the model's block with it (at ``BUILT_CHECK``); the first that does not sends this block and
    the rest through the exporter. The exporter (several seconds per graph) runs once, for block 0. Every
    other block is block 0's graph with block 0's weights swapped for its own (matched by value, as is or
    transposed), accepted only when ONNX Runtime computes the same as the model's block on random inputs (a
    block with its own constants, e.g. GPT-2's ``scale_attn_by_inverse_layer_idx``, fails that check and is
    exported by itself).
    ``progress(i, exported)`` is called after each block."""
    import onnx
    from onnx import numpy_helper

    exported = 0
    template = sources = None
    build = True
    for i, path in enumerate(paths):
        done = False
        built = adapter.block_graph(i, opset) if build else None
        build = build and built is not None  # a family that builds no graph for one builds none
        if built is not None:
            onnx.save(built, str(path))
            try:
                done = _block_matches_torch(adapter, i, path, shapes=BUILT_CHECK)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime refusing the graph is a mismatch too
                log.warning("ONNX Runtime refuses the built graph of block %d (%s)", i, str(e).splitlines()[0][:200])
            if not done:
                log.warning("the built graph of block %d does not compute the model's block: exporting the "
                            "blocks from here on with torch", i)
                build = False
        if not done and template is not None and sources:
            model = onnx.ModelProto()
            model.CopyFrom(template)
            params = dict(adapter.block_module(i).named_parameters())
            for init in model.graph.initializer:
                if init.name in sources:
                    name, transposed = sources[init.name]
                    w = params[name].detach().float().numpy()
                    init.CopyFrom(numpy_helper.from_array(w.T.copy() if transposed else w, init.name))
            onnx.save(model, str(path))
            onnx.checker.check_model(str(path), full_check=True)
            done = _block_matches_torch(adapter, i, path)
            if not done:
                log.info("block %d has constants of its own: exporting it by itself", i)
        if not done:
            export_block(adapter, i, path, opset)
            exported += 1
            if template is None:
                template = onnx.load(str(path))
                try:
                    sources = _weight_sources(template.graph, adapter.block_module(i))
                except LookupError as e:
                    log.info("exporting every block by itself: %s", e)
        if progress is not None:
            progress(i, not done)
    return exported


def export_head(adapter: FamilyAdapter, path: Path, opset: int = DEFAULT_OPSET) -> None:
    s = adapter.shape
    t = torch.export.Dim("T", min=1, max=max(2, s.max_positions))
    hidden = torch.randn(1, _EX_T, s.hidden_size)
    if s.causal:
        _export(_Head(adapter), (hidden,), path, ["hidden"], ["logits"], {"hidden": {1: t}}, opset)
    else:
        mask = torch.ones(1, _EX_T, dtype=torch.long)
        _export(_EncoderHead(adapter), (hidden, mask), path, ["hidden", "attention_mask"], ["embedding"],
                {"hidden": {1: t}, "attention_mask": {1: t}}, opset)


TIED_FILE = "tied_embedding.bin"


def _tied_pair(embed, head):
    """(embedding initializer, head initializer, W (V, C)) when the head's matrix is exactly the transpose
    of the embedding table, else None."""
    import numpy as np
    from onnx import numpy_helper

    e_init = max(embed.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(e_init)  # (V, C)
    if w.ndim != 2:
        return None
    h_init = next((t for t in head.graph.initializer if list(t.dims) == [w.shape[1], w.shape[0]]), None)
    if h_init is None or not np.array_equal(numpy_helper.to_array(h_init), w.T):
        return None
    return e_init, h_init, w


def is_tied(embed_path: Path, head_path: Path) -> bool:
    """Whether the exported head multiplies by exactly the transpose of the embedding table."""
    import onnx

    return _tied_pair(onnx.load(str(embed_path)), onnx.load(str(head_path))) is not None


def share_tied_embedding(bundle_dir: Path, embed_file: str, head_file: str, fp16: bool = False) -> bool:
    """Store a tied embedding / LM-head matrix once, in ``tied_embedding.bin``, for both graphs.

    The embed graph gathers rows of W (V, C); the exported head multiplies by W^T (C, V). When the
    head's matrix is exactly the transpose of the embedding, both graphs are rewritten to read W
    from one external-data file, and the head gets a Transpose node (ORT folds it at load time).
    Returns False (and changes nothing) when the weights are not tied. ``fp16``: the file holds W in
    float16 (half the bytes) and both graphs Cast it to float first (ORT folds the Cast at load time).
    """
    import numpy as np
    import onnx
    from onnx import helper

    bundle_dir = Path(bundle_dir)
    embed = onnx.load(str(bundle_dir / embed_file))
    head = onnx.load(str(bundle_dir / head_file))
    found = _tied_pair(embed, head)
    if found is None:
        return False
    e_init, h_init, w = found
    data = np.ascontiguousarray(w, dtype="<f2" if fp16 else "<f4").tobytes()
    (bundle_dir / TIED_FILE).write_bytes(data)
    dtype = onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT

    def external(name: str) -> onnx.TensorProto:
        return external_tensor(name + ("_fp16" if fp16 else ""), dtype, list(w.shape), TIED_FILE, 0, len(data))

    e_init.CopyFrom(external(e_init.name))
    transposed = h_init.name
    head.graph.initializer.remove(h_init)
    head.graph.initializer.append(external("tied_embedding"))
    head.graph.node.insert(0, helper.make_node("Transpose", ["tied_embedding"], [transposed], perm=[1, 0],
                                               name="tied_embedding_transpose"))
    if fp16:
        for model, name in ((embed, e_init.name[:-len("_fp16")]), (head, "tied_embedding")):
            model.graph.node.insert(0, helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                                        name=name + "_to_float"))
    for model, name in ((embed, embed_file), (head, head_file)):
        onnx.save(model, str(bundle_dir / name))
        onnx.checker.check_model(str(bundle_dir / name), full_check=True)
    return True
