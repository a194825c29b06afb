"""EdgeRuntime: the bundle's front half in ONNX Runtime, with a numpy KV cache. No torch here.

Block graphs built around ONNX Runtime's GroupQueryAttention (the Llama family) append to the cache in
place: each block's keys and values live in one buffer per layer (doubling as it fills), bound as the
graph's past and present at once, so a decode step copies no past position (``LayerCache``). Graphs from
torch's exporter return new, one-longer arrays each step.

ORT sessions are set up for a small device: ``intra_op_num_threads`` from the caller (default 1
per session: many sessions with spinning thread pools on 2 cores ran 6-7x slower), spinning off,
sequential execution, full graph optimisation. The agent calls the sessions one job at a time through
one worker (``worker.ComputeWorker``: its thread, or the event loop for a short decode row while that
thread is idle), so ``seamline edge --threads N`` (``intra_op_num_threads``) is the whole of the edge's
compute parallelism; inter-op parallelism stays at 1.

In-place block graphs run as composed segments (``segments.py``): one ONNX Runtime call per segment instead
of one per block; a segment is cut in two where a split first falls inside it (``EdgeRuntime._cut``).

Start-up checks the whole bundle, so that a broken one fails to start (never at the first request):
every graph is loaded and its inputs and outputs checked against the conventions of ``bundle.py``,
the embedding runs once (its width must be ``hidden_size``), and the tokenizer is loaded and tried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from seamline.edge.segments import FOLDER_KEY, Composed, NotComposable, UnreadableBlock, compose, kv_names
from seamline.edge.table import QuantizedRows, rescore_top
from seamline.protos.bundle import (
    HEAD_INPUT,
    HEAD_TOP_IDS,
    KV_IN_PLACE_META,
    RESCORE_META,
    ROPE_META,
    BundleError,
    Manifest,
    bundle_file,
    load_bundle,
)

log = logging.getLogger(__name__)


@dataclass
class LayerCache:
    """Past keys/values of one block: (1, Hkv, capacity, D) each, of which the first ``length`` positions
    are valid. A block graph that appends in place (``_Graph.kv_in_place``) writes new positions into
    this buffer through an ``OrtValue`` bound as its past and its present at once; any other graph returns
    new arrays of exactly ``length`` positions."""

    key: np.ndarray
    value: np.ndarray
    length: int = -1  # -1: the arrays' own length
    bound: tuple | None = None  # (key, value) OrtValues over the two buffers (in-place graphs)

    def __post_init__(self) -> None:
        if self.length < 0:
            self.length = int(self.key.shape[2])

    @property
    def capacity(self) -> int:
        return int(self.key.shape[2])

    def valid(self) -> tuple[np.ndarray, np.ndarray]:
        """The valid positions as exactly-sized arrays (views)."""
        return self.key[:, :, :self.length], self.value[:, :, :self.length]


@dataclass
class EdgeCache:
    """The edge's KV cache for blocks [0, n); ``layers[i]`` is None until block i has run."""

    layers: list[LayerCache | None] = field(default_factory=list)
    reserve: int = 0  # positions an in-place buffer is first made for (the generation's prompt + new tokens)

    def length(self, k: int) -> int:
        """Positions cached consistently in blocks [0, k); -1 if they disagree (replay needed)."""
        if k == 0:
            return 0
        lens = {(c.length if c is not None else 0) for c in self.layers[:k]}
        if len(self.layers) < k:
            lens.add(0)
        return lens.pop() if len(lens) == 1 else -1

    def truncate(self, length: int) -> None:
        """Forget positions >= ``length`` in every block (a speculative step's rejected drafts). An in-place
        buffer keeps its memory (later positions are written over); other caches are cut to size."""
        for i, c in enumerate(self.layers):
            if c is not None and c.length > length:
                if c.bound is not None:
                    c.length = length
                else:
                    self.layers[i] = LayerCache(np.ascontiguousarray(c.key[:, :, :length]),
                                                np.ascontiguousarray(c.value[:, :, :length]))


KV_MIN_CAPACITY = 64  # positions an in-place KV buffer starts with (then doubles)
# A long prompt runs through the blocks this many positions at a time (into the same in-place caches): the
# activations of a 512-token prefill peaked 40 MB higher in one call (SmolLM2 int4 edge, every layer: peak RSS
# 328 against 288 MB at 128), for the same time (2.13-2.49 s against 2.20-2.42 s).
PREFILL_CHUNK = 128
ROPE_MIN_ROWS = 1024  # positions the rope tables start with (then double; 256 KB at head size 64)


def rope_tables(meta: dict[str, str], positions: int) -> dict[str, np.ndarray]:
    """The ``rope_cos`` / ``rope_sin`` inputs (positions, D/2) of a block graph whose metadata names its rotary
    frequencies (``partitioner/families/llama_onnx.py``), as the model's rotary module computes them; {} for
    a graph without them."""
    import json

    spec = meta.get(ROPE_META)
    if spec is None:
        return {}
    r = json.loads(spec)
    freqs = np.arange(positions, dtype=np.float32)[:, None] * np.asarray(r["inv_freq"], dtype=np.float32)[None, :]
    scale = float(r.get("scaling", 1.0))
    return {"rope_cos": (np.cos(freqs.astype(np.float64)) * scale).astype(np.float32),
            "rope_sin": (np.sin(freqs.astype(np.float64)) * scale).astype(np.float32)}


_SHARED_ARENA: list[bool] = []  # registered once per process


def _share_one_arena() -> None:
    """Register one CPU arena for every session of this process: the blocks run one after another, so the
    intermediates of one reuse the memory of the last (a session's own arena keeps the peak of its own
    largest call, a prefill chunk, for the life of the process: ~15 MB per SmolLM2 block).

    The arena grows by powers of two (``arena_extend_strategy`` 0). Growing by exactly the request (1) kept
    a new region for every decode step of a graph that returns its keys and values as new arrays (GPT-2,
    BERT-style exports: one position longer each step), never reused by the next, longer step: a 512-token
    GPT-2-124M generation peaked at 1,353 MB against 412 MB, and each decode step of a new length faulted
    in ~18 MB of fresh pages (39 against 11 ms for 6 layers on this VM). In-place graphs (Llama family)
    peak the same either way (SmolLM2 int4: 297 MB)."""
    import onnxruntime as ort

    if not _SHARED_ARENA:
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(mem, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
        _SHARED_ARENA.append(True)


def session_options(threads: int = 1):
    import onnxruntime as ort

    _share_one_arena()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


_REPARTITION = "re-run `partition` (or copy the bundle again)"


class _Graph:
    """One ORT session over blocks [first, stop) (or the embedding or head); feeds only the inputs the graph
    kept (exporters drop unused ones). ``source``: a graph file, or a composed run of in-place block graphs
    (``segments.py``)."""

    def __init__(self, source: Path | Composed, threads: int, shown: Path | str | None = None,
                 need: tuple[str, ...] = (), outputs: int = 1, first: int = 0):
        import onnxruntime as ort

        so = session_options(threads)
        if isinstance(source, Composed):
            so.add_session_config_entry(FOLDER_KEY, str(source.folder))
            model, what = source.model, "these graphs as one"
            self.path, self.first, self.stop = source.folder, source.first, source.stop
        else:
            model, what = str(source), "this graph"
            self.path, self.first, self.stop = source, first, first + 1
        shown = shown or self.path
        try:
            self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for a bad model
            first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise BundleError(f"{shown}: ONNX Runtime cannot load {what} ({first_line}); the file is corrupt "
                              f"or not an ONNX model: {_REPARTITION}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        missing = [n for n in need if n not in self.inputs]
        if missing:
            raise BundleError(f"{shown}: the graph lacks the inputs {missing} (it has "
                              f"{sorted(self.inputs)}); it is not a graph of this bundle's kind: "
                              f"{_REPARTITION}")
        if len(self.session.get_outputs()) < outputs:
            raise BundleError(f"{shown}: the graph has {len(self.session.get_outputs())} outputs, {outputs} "
                              f"expected: {_REPARTITION}")

        self.meta = self.session.get_modelmeta().custom_metadata_map
        if isinstance(source, Composed):
            self.kv_in_place, self.kv = True, [kv_names(i) for i in range(self.first, self.stop)]
        else:
            self.kv_in_place = self.meta.get(KV_IN_PLACE_META) == "1" and {"past_key", "position_ids"} <= self.inputs
            self.kv = [("past_key", "past_value", "present_key", "present_value")]
        self.tables: dict[str, np.ndarray] = {}  # inputs the runtime supplies (rope tables, shared by the blocks)
        self._io = None  # run_in_place's I/O binding, reused across calls
        self._kv_bound: list = [None] * len(self.kv)  # the (key, value) OrtValues bound in it now, per block
        self._tables_bound: dict | None = None  # the rope tables bound in it now

    def unbind(self) -> None:
        """Drop the I/O binding (and the buffers it holds); the next ``run_in_place`` makes a new one."""
        self._io, self._tables_bound = None, None
        self._kv_bound = [None] * len(self.kv)

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        feeds = {**self.tables, **feeds}
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})

    def run_in_place(self, hidden, pos: np.ndarray, caches: list[LayerCache]):
        """One call of an in-place graph (one block or a composed run): the new positions go into each block's
        cache buffers, no copy of the past (``partitioner/families/llama_onnx.py``). ``hidden``: a float32
        array (1, T, C) or the OrtValue the previous graph returned; returns hidden_out as an OrtValue (the
        next graph binds it as it is: no numpy round trip between graphs).

        One I/O binding per graph, reused: the past/present buffers and the rope tables are bound again
        only when they change (a new or grown cache, longer tables), so a decode step binds two inputs and
        one output per graph. The binding holds the last caches' buffers until other caches are bound."""
        import onnxruntime as ort

        io = self._io
        if io is None:
            io = self._io = self.session.io_binding()
            io.bind_output("hidden_out", "cpu")  # first: get_outputs() lists the outputs in binding order
        for j, cache in enumerate(caches):
            if cache.bound is None:
                cache.bound = (ort.OrtValue.ortvalue_from_numpy(cache.key),
                               ort.OrtValue.ortvalue_from_numpy(cache.value))
            if self._kv_bound[j] is not cache.bound:
                past_key, past_value, present_key, present_value = self.kv[j]
                key, value = cache.bound
                io.bind_ortvalue_input(past_key, key)
                io.bind_ortvalue_input(past_value, value)
                io.bind_ortvalue_output(present_key, key)
                io.bind_ortvalue_output(present_value, value)
                self._kv_bound[j] = cache.bound
        if self._tables_bound is not self.tables:
            for name, v in self.tables.items():
                io.bind_cpu_input(name, v)  # the arrays live in self.tables as long as they are bound
            self._tables_bound = self.tables
        if isinstance(hidden, np.ndarray):
            io.bind_cpu_input("hidden", np.ascontiguousarray(hidden, dtype=np.float32))
        else:
            io.bind_ortvalue_input("hidden", hidden)
        io.bind_cpu_input("position_ids", pos)
        io.bind_output("hidden_out", "cpu")  # a new output each call: the last one is the next graph's input
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0]


def _array(hidden) -> np.ndarray:
    """A block's output as a numpy array (in-place graphs return OrtValues)."""
    return hidden if isinstance(hidden, np.ndarray) else hidden.numpy()


class EdgeRuntime:
    """Runs embed + blocks [0, k) (+ head when the bundle has it) for one device."""

    def __init__(self, bundle_dir: Path | str, threads: int = 1, int8: bool = False, verify: bool = True,
                 precision: str | None = None, compose: bool = True):
        """``precision``: which of the bundle's graph sets to run (fp32, int4, int8, int8-dynamic; default:
        the one it was partitioned with). ``int8`` (legacy) = "int8", else "int8-dynamic".

        ``compose``: run consecutive in-place block graphs as one graph per segment (``segments.py``): the
        blocks start as one segment [0, n) and a segment is cut in two where a split first falls inside it
        (``_cut``), so each split costs one ONNX Runtime call per segment before it. Tools that sweep every
        split or time single blocks (verify, profile) pass False: one session per block."""
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = load_bundle(self.bundle_dir, verify=verify)
        m = self.manifest
        if int8 and precision is None:
            precision = "int8-dynamic" if "int8-dynamic" in m.precisions() and "int8" not in m.precisions() else "int8"
        names = m.graph_set(precision)  # BundleError naming the precisions shipped
        self.precision = precision or m.precision
        self.int8 = self.precision.startswith("int8")
        self._embed_name = names["embed"]

        def graph(name: str, need: tuple[str, ...], outputs: int) -> _Graph:
            return _Graph(bundle_file(self.bundle_dir, name), threads, self.bundle_dir / name, need, outputs)

        self.embed = self._quantized_rows(names["embed"]) or graph(names["embed"], ("input_ids",), 1)
        self._threads = threads
        self._block_names: list[str] = list(names["blocks"])
        self._rope: dict[str, np.ndarray] = {}  # the rope tables every block graph that takes them shares
        self._rope_rows = 0  # positions they cover (grown with the caches)
        self.composed = False  # True while the blocks run as composed segments
        self._runs: list[_Graph] = self._load_runs(compose and m.causal)  # cover [0, n) in order
        self.head = graph(names["head"], ("hidden",), 1) if names.get("head") else None
        self._head_rows = self._head_rescoring(names["head"]) if self.head is not None else None
        self._ensure_rope(ROPE_MIN_ROWS)
        self._tokenizer = self._load_tokenizer()
        self._check_embed()

    def _head_rescoring(self, name: str) -> QuantizedRows | None:
        """The rows of a level-4 head whose top logits are recomputed exactly (``table.rescore_top``; the graph's
        own TopK says which), when its graph says where they are; else None."""
        meta = self.head.meta.get(RESCORE_META)
        if not meta or [o.name for o in self.head.session.get_outputs()][1:3] != [HEAD_INPUT, HEAD_TOP_IDS]:
            return None
        folder = Path(name).parent
        try:
            rows = QuantizedRows.of_head(meta, lambda loc: bundle_file(self.bundle_dir, str(folder / loc)))
        except ValueError as e:
            raise BundleError(f"{self.bundle_dir / name}: {e}") from None
        m = self.manifest
        if (rows.vocab, rows.width) != (m.vocab_size, m.hidden_size):
            raise BundleError(f"{self.bundle_dir / name}: its rescoring rows are {rows.vocab} x {rows.width}, the "
                              f"model's head {m.vocab_size} x {m.hidden_size}: {_REPARTITION}")
        return rows

    def _quantized_rows(self, name: str) -> QuantizedRows | None:
        """A quantized token table read row by row from its file (``table.py``: no mapped file whose pages a
        prompt makes resident), when the embedding graph is that one gather; else None (ONNX Runtime)."""
        folder = Path(name).parent
        try:
            return QuantizedRows.of(bundle_file(self.bundle_dir, name),
                                    lambda loc: bundle_file(self.bundle_dir, str(folder / loc)))
        except BundleError:
            raise
        except ValueError as e:
            raise BundleError(str(e)) from None
        except Exception:  # noqa: BLE001 - an unreadable graph: ONNX Runtime's load then says what is wrong
            return None

    def _load_runs(self, compose: bool) -> list[_Graph]:
        """The block graphs: one composed segment [0, n) when every block is an in-place graph of one
        folder, else one session per block."""
        n = len(self._block_names)
        if compose and n:
            try:
                runs = [self._composed(0, n)]
                self.composed = True
                return runs
            except NotComposable as e:
                log.debug("blocks run one graph each: %s", e)
        need = ("hidden", "past_key", "past_value") if self.manifest.causal else ("hidden",)
        return [_Graph(bundle_file(self.bundle_dir, b), self._threads, self.bundle_dir / b, need,
                       3 if self.manifest.causal else 1, first=i) for i, b in enumerate(self._block_names)]

    def _composed(self, first: int, stop: int) -> _Graph:
        names = self._block_names[first:stop]
        paths = [bundle_file(self.bundle_dir, b) for b in names]
        try:
            seg = compose(paths, first)
        except UnreadableBlock as e:
            raise BundleError(f"{self.bundle_dir / names[paths.index(e.path)]}: ONNX Runtime cannot load this graph "
                              f"(it does not parse as an ONNX model); the file is corrupt or not an ONNX model: "
                              f"{_REPARTITION}") from None
        shown = f"{self.bundle_dir / self._block_names[first]} .. {Path(self._block_names[stop - 1]).name}"
        g = _Graph(seg, self._threads, shown, outputs=1 + 2 * (stop - first))
        g.tables = self._rope if ROPE_META in g.meta else {}
        return g

    def _cut(self, k: int) -> None:
        """Make ``k`` a segment boundary: the composed segment [a, b) around it becomes [a, k) and [k, b). The
        old session goes first, so the weights are held once (load time instead: composing and loading all 30
        SmolLM2 int4 blocks took 0.66 s here, against 0.43 s for one session per block)."""
        for idx, g in enumerate(self._runs):
            if g.first < k < g.stop:
                a, b = g.first, g.stop
                del g, self._runs[idx]
                t0 = time.perf_counter()
                self._runs[idx:idx] = [self._composed(a, k), self._composed(k, b)]
                log.info("edge blocks [%d, %d) split at %d into two graphs (%.2f s)", a, b, k,
                         time.perf_counter() - t0)
                return

    def prepare(self, *splits: int) -> None:
        """Make every split a segment boundary now (load the graphs it needs), outside a timed step."""
        for k in splits:
            self._cut(k)

    def _runs_in(self, a: int, b: int) -> list[_Graph]:
        """The graphs that run blocks [a, b), in order (cutting segments so that a and b are boundaries)."""
        self._cut(a)
        self._cut(b)
        return [g for g in self._runs if a <= g.first and g.stop <= b]

    @property
    def blocks(self) -> list[_Graph]:
        """One graph per block (a runtime made with ``compose=False``): for timing or feeding blocks alone."""
        if self.composed:
            raise RuntimeError("this EdgeRuntime runs composed segments; make it with compose=False to run "
                               "single blocks")
        return self._runs

    def _load_tokenizer(self):
        from tokenizers import Tokenizer

        shown = self.bundle_dir / self.manifest.tokenizer
        path = bundle_file(self.bundle_dir, self.manifest.tokenizer)
        try:
            tok = Tokenizer.from_file(str(path))
            tok.no_padding()  # some tokenizer.json files pad or truncate to a fixed length (encoders)
            tok.no_truncation()
            ids = tok.encode("Hello, world.").ids
            tok.decode(ids)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise BundleError(f"{shown}: the tokenizer cannot be loaded or used ({str(e)[:300]}): "
                              f"{_REPARTITION}") from None
        size = tok.get_vocab_size(with_added_tokens=True)
        if size > self.manifest.vocab_size or any(not 0 <= i < self.manifest.vocab_size for i in ids):
            raise BundleError(f"{shown}: the tokenizer has {size} tokens, more than the model's vocab_size "
                              f"{self.manifest.vocab_size}; it belongs to another model: {_REPARTITION}")
        return tok

    def _check_embed(self) -> None:
        """Run the embedding on one token: it must load its weights and produce hidden_size columns."""
        m = self.manifest
        shown = self.bundle_dir / self._embed_name
        try:
            (hidden,) = self.embed.run(input_ids=np.zeros((1, 1), dtype=np.int64),
                                       position_ids=np.zeros((1, 1), dtype=np.int64))[:1]
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BundleError(f"{shown}: the embedding graph fails on one token ({str(e)[:300]}): "
                              f"{_REPARTITION}") from None
        if hidden.shape[-1] != m.hidden_size:
            raise BundleError(f"{shown}: the embedding produces width {hidden.shape[-1]}, the manifest says "
                              f"hidden_size {m.hidden_size}: {_REPARTITION}")

    # -- properties ---------------------------------------------------------------------
    @property
    def num_edge_layers(self) -> int:
        return len(self._block_names)

    @property
    def tokenizer(self):
        return self._tokenizer

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; releases the GIL while it works (call it from a thread)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def new_cache(self, reserve: int = 0) -> EdgeCache:
        """An empty cache; ``reserve``: the positions it will likely hold, so that in-place buffers are made
        that size at once (no doubling: a 512-token prompt and 64 new tokens hold 576 positions, not 1,024,
        and never the old and the new buffer together)."""
        return EdgeCache([None] * self.num_edge_layers, reserve)

    # -- compute ------------------------------------------------------------------------
    def forward(self, ids: list[int] | np.ndarray, start: int, k: int, cache: EdgeCache) -> np.ndarray:
        """Embed ``ids`` at positions start.. and run blocks [0, k); returns hidden (T, C) float32.

        The cache of blocks [0, k) must hold exactly ``start`` positions (else replay first).
        """
        if k > self.num_edge_layers:
            raise BundleError(f"split {k} needs {k} edge layers; this bundle exports "
                              f"{self.num_edge_layers} (re-run `partition` with a larger --max-edge-layers)")
        have = cache.length(k)
        if k > 0 and have != start:  # k = 0 is the embedding alone: no cache to agree with
            raise ValueError(f"edge cache holds {have} positions in blocks [0,{k}), step starts at {start}; "
                             "replay the history from position 0")
        ids_arr = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # (1, T)
        t = ids_arr.shape[1]
        if self.manifest.causal and k > 0 and t > PREFILL_CHUNK:
            return np.concatenate([self.forward(ids_arr[0, a:a + PREFILL_CHUNK], start + a, k, cache)
                                   for a in range(0, t, PREFILL_CHUNK)])
        pos = np.arange(start, start + t, dtype=np.int64).reshape(1, -1)  # (1, T)
        (hidden,) = self.embed.run(input_ids=ids_arr, position_ids=pos)  # (1, T, C)
        for g in self._runs_in(0, k):
            if self.manifest.causal:
                hidden = self._run(g, hidden, start, pos, cache)
            else:
                (hidden,) = g.run(hidden=hidden, attention_mask=np.ones((1, t), dtype=np.int64))
        return np.ascontiguousarray(_array(hidden)[0], dtype=np.float32)  # (T, C)

    def continue_from(self, hidden: np.ndarray, start: int, k_from: int, k_to: int,
                      cache: EdgeCache) -> np.ndarray:
        """Run blocks [k_from, k_to) on hidden (T, C) at positions start.. (used for local fallback)."""
        if self.manifest.causal and len(hidden) > PREFILL_CHUNK:
            return np.concatenate([self.continue_from(hidden[a:a + PREFILL_CHUNK], start + a, k_from, k_to, cache)
                                   for a in range(0, len(hidden), PREFILL_CHUNK)])
        h = hidden.reshape(1, *hidden.shape).astype(np.float32)
        t = h.shape[1]
        pos = np.arange(start, start + t, dtype=np.int64).reshape(1, -1)
        for i in range(k_from, k_to):
            have = cache.layers[i].length if cache.layers[i] is not None else 0
            if have != start:
                raise ValueError(f"edge cache of block {i} holds {have} positions, expected {start}")
        for g in self._runs_in(k_from, k_to):
            h = self._run(g, h, start, pos, cache)
        return _array(h)[0]

    def _run(self, graph: _Graph, hidden, start: int, pos: np.ndarray, cache: EdgeCache):
        """Causal blocks [graph.first, graph.stop) on hidden (1, T, C) at positions start..: their caches grow
        by T positions. Takes and returns an array or, between in-place graphs, an OrtValue (``_array``
        converts)."""
        t = pos.shape[1]
        if graph.tables and self._rope_rows < start + t:
            self._ensure_rope(start + t)
        if graph.kv_in_place:
            caches = []
            for i in range(graph.first, graph.stop):
                c = cache.layers[i]
                if c is None or c.capacity < start + t:
                    c = cache.layers[i] = self._grown(c, start + t, cache.reserve)
                caches.append(c)
            out = graph.run_in_place(hidden, pos, caches)
            for c in caches:
                c.length = start + t
            return out
        m, i = self.manifest, graph.first  # a graph that returns new arrays: one block
        c = cache.layers[i]
        if c is None:
            z = np.zeros((1, m.num_kv_heads, 0, m.head_dim), dtype=np.float32)
            c = LayerCache(z, z.copy())
        hidden, key, value = graph.run(hidden=_array(hidden), past_key=c.key, past_value=c.value, position_ids=pos)
        cache.layers[i] = LayerCache(key, value)
        return hidden

    def release(self, cache: EdgeCache) -> None:
        """A finished generation's cache: its buffers are freed now, not when the next generation binds its
        own (an I/O binding holds the buffers it was last given: without this, one generation's KV cache
        stayed alive beside the next one's). Call it on the compute worker's thread (``ComputeWorker.later``)."""
        held = {id(c.bound) for c in cache.layers if c is not None and c.bound is not None}
        for g in self._runs:
            if any(id(b) in held for b in g._kv_bound if b is not None):
                g.unbind()
        cache.layers = [None] * len(cache.layers)

    def _ensure_rope(self, rows: int) -> None:
        """Rope tables of at least ``rows`` positions (doubling, up to max_positions) for every block graph that
        takes them, shared by all (a 128k-context model does not hold 2 x 17 MB of tables for a short chat)."""
        takers = [g for g in self._runs if ROPE_META in g.meta]
        if not takers or rows <= self._rope_rows:
            return
        n = max(rows, min(max(2 * self._rope_rows, ROPE_MIN_ROWS), self.manifest.max_positions))
        self._rope = rope_tables(takers[0].meta, n)
        for g in takers:
            g.tables = self._rope
        self._rope_rows = n

    def _grown(self, c: LayerCache | None, need: int, reserve: int = 0) -> LayerCache:
        """An in-place buffer of at least ``need`` positions (the first one ``reserve``, then doubling, up to
        max_positions), holding ``c``'s."""
        m = self.manifest
        have = c.capacity if c is not None else 0
        cap = max(KV_MIN_CAPACITY, have * 2) if c is not None or reserve <= 0 else reserve
        while cap < need:
            cap *= 2
        cap = max(need, min(cap, m.max_positions))
        key = np.zeros((1, m.num_kv_heads, cap, m.head_dim), dtype=np.float32)
        value = np.zeros_like(key)
        length = 0 if c is None else c.length
        if length:
            old_k, old_v = c.valid()
            key[:, :, :length], value[:, :, :length] = old_k, old_v
        return LayerCache(key, value, length)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Final norm + LM head on hidden (T, C) -> logits (T, V). Needs a full bundle."""
        if self.head is None:
            raise BundleError(f"{self.bundle_dir}: this bundle has no head graph (it exports "
                              f"{self.num_edge_layers} of {self.manifest.num_layers} layers); local "
                              "generation needs a bundle partitioned with every layer")
        out = self.head.run(hidden=hidden.reshape(1, *hidden.shape).astype(np.float32))
        if self._head_rows is None:
            return out[0][0]
        # a level-4 head: its top logits (the graph's TopK ids) made exact from the table's rows
        return rescore_top(out[0][0], out[1][0], self._head_rows, out[2][0])

    def sentence_embedding(self, ids: list[int], k: int | None = None) -> np.ndarray:
        """Encoders: pooled sentence embedding from the edge alone (needs a full bundle)."""
        k = self.num_edge_layers if k is None else k
        hidden = self.forward(ids, 0, k, self.new_cache())
        mask = np.ones((1, hidden.shape[0]), dtype=np.int64)
        (emb,) = self.head.run(hidden=hidden[None], attention_mask=mask)
        return emb[0]
