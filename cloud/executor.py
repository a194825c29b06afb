"""``TorchExecutor``: the back half (blocks k..L + head) of a batch of sessions, on one worker thread.

Every torch call runs on the executor's single worker thread (``await executor.run(fn, ...)``), so
the event loop never blocks and the KV slab has one writer. The executor owns the KV cache
(``self.pool``: one slab, an extent per session and layer, see kvpool.py). A forward pass takes rows
of the same split k and the same chunk length T. Rows with different past lengths are batched by
gathering one layer's past at a time with one index (rows right-aligned, padding pointing at the pool's
zero position, then the T new positions as room; the gathered copy is counted against --kv-budget while the pass runs);
the attention mask hides the padding and each row gets its own position ids, so a row sees exactly the
keys it would see alone. The block writes its new keys and values into that room (``CacheRoom``: no copy of
the past), and they go into the slab in place, one indexed write per layer; a row alone has its block
write straight into its extents. The
rows' hidden states arrive as checked, still-quantized tensors and are dequantized in one call.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from seamline.partitioner.families import adapter_for
from seamline.partitioner.families.base import CacheRoom
from seamline.protos import codec

from .config import CloudConfig, ConfigError
from .errors import InvalidArgument
from .kvpool import PAD, KVPool
from .messages import Row
from .sampling import Sample, sample_rows

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA device here; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class ModelExecutor:
    """A model on the configured device and dtype, with its family adapter and one worker thread."""

    runs_model = True  # its passes run the model's blocks and head (the server tunes their matmuls on CPU)

    def __init__(self, model: torch.nn.Module, config: CloudConfig):
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.adapter = adapter_for(self.model)
        self.shape = self.adapter.shape
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seamline-torch")

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{self.device.index or 0}"
        return str(self.device)


class TorchExecutor(ModelExecutor):
    def __init__(self, model: torch.nn.Module, config: CloudConfig):
        super().__init__(model, config)
        if not self.shape.causal:
            self.worker.shutdown(wait=False)
            raise ConfigError(f"{self.shape.family} is an encoder; seamline cloud serves causal language "
                              "models (GPT-2, Llama-family)")
        self.pool = KVPool(self.shape, self.dtype, self.device, config.kv_budget)  # every session's KV

    def bytes_per_token(self, split: int) -> int:
        """KV bytes one position costs for layers split..L."""
        return self.pool.bytes_per_token(split)

    def scratch_bytes(self, rows: list[Row]) -> int:
        """Bytes of the padded copy ``forward(rows)`` will allocate (0 for a single row or no layers)."""
        if rows[0].session.split >= self.shape.num_layers:
            return 0
        return self.pool.scratch_bytes(len(rows), max(r.session.position for r in rows) + rows[0].tokens)

    # ---------------------------------------------------------------- worker thread only below

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> tuple[list[Sample | None], float]:
        """One forward pass over rows of the same split and chunk length; returns (samples, ms).

        Each session's extents must have room for its new positions (``SessionStore.reserve``); a
        batch of several rows also needs ``scratch_bytes(rows)`` held (``SessionStore.hold_scratch``).
        A hidden state that does not dequantize raises INVALID_ARGUMENT (the scheduler then runs the
        rows alone, so only the culprit fails).
        """
        t0 = time.perf_counter()
        s, dev, pool = self.shape, self.device, self.pool
        k, t = rows[0].session.split, rows[0].tokens
        b, n = len(rows), s.num_layers - k
        starts = [r.session.position for r in rows]
        pmax = max(starts)
        p = torch.tensor(starts, device=dev)  # (B,)
        pos = p[:, None] + torch.arange(t, device=dev)  # (B, T)
        if k == 0:
            ids = torch.from_numpy(np.stack([r.token_ids for r in rows])).to(dev)  # (B, T)
            x = self.adapter.embed(ids, pos).to(self.dtype)  # (B, T, C)
        else:
            x = torch.from_numpy(_hidden_batch(rows)).to(dev, self.dtype)  # (B, T, C)
        if n:
            extents = [pool.ensure(r.session.id, n, r.session.capacity, q) for r, q in zip(rows, starts, strict=True)]
            slab = pool.slab  # after every ensure: a growing slab is replaced
            if b == 1:
                x = self._layers_alone(x, k, extents[0], starts[0], pos)
            else:
                first = torch.tensor([[e.start for e in ext] for ext in extents], device=dev).T  # (n, B)
                # (B, Pmax+T): a row's past right-aligned (< 0 is padding), then its T new positions
                rel = torch.arange(pmax + t, device=dev)[None] - (pmax - p)[:, None]
                valid = rel >= 0
                # (n, B, Pmax+T) slab positions; the last T are the new rows' own: gathered too (the room the block
                # writes the new keys and values into), and where they go back after the block
                gather = torch.where(valid, first[:, :, None] + rel, PAD)
                mask = valid.long()
                pool.new_scratch(b, pmax + t)
                try:
                    for j in range(n):
                        # (B, Pmax+T, 2, Hkv, D): the batch's one copy of this layer, into the pass's buffer
                        # (index_select: ~4x faster than indexing with the (B, Pmax) tensor, measured on CPU
                        # at B = 32, Pmax = 100); the block writes its new rows at Pmax (no torch.cat copy)
                        buf = pool.gather(gather[j].reshape(-1)).view(b, pmax + t, *slab.shape[1:])
                        x, _, _ = self.adapter.block(k + j, x, CacheRoom(buf[:, :, 0].transpose(1, 2), pmax),
                                                     CacheRoom(buf[:, :, 1].transpose(1, 2), pmax), pos, mask)
                        slab[gather[j, :, pmax:]] = buf[:, pmax:]  # (B, T, 2, Hkv, D): the slab's layout, in place
                finally:
                    pool.drop_scratch()
        samples = sample_rows(self.adapter, rows, x, starts)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return samples, (time.perf_counter() - t0) * 1e3

    def _layers_alone(self, x: torch.Tensor, k: int, extents, start: int, pos: torch.Tensor) -> torch.Tensor:
        """Blocks k..L for one row: its past is a view of its extents, and the block writes its new positions
        into the extents right after it (``CacheRoom``: no copy of the past)."""
        slab, t = self.pool.slab, x.shape[1]
        if any(e.length < start + t for e in extents):  # the block writes in place: never past its own extent
            raise RuntimeError(f"an extent of {min(e.length for e in extents)} positions cannot take {start} + {t}; "
                               "the step was not reserved (SessionStore.reserve)")
        for j, e in enumerate(extents):
            full = slab[e.start:e.start + start + t]  # (P+T, 2, Hkv, D), a view; the extent has room for T
            x, _, _ = self.adapter.block(k + j, x, CacheRoom(full[None, :, 0].transpose(1, 2), start),
                                         CacheRoom(full[None, :, 1].transpose(1, 2), start), pos)
        return x

    @torch.inference_mode()
    def measure_layer_ms(self, past: int = 16, repeats: int = 5) -> tuple[list[float], float]:
        """Median ms of each block and of the head for one decode token over ``past`` cached positions."""
        s, dev = self.shape, self.device
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 1, s.hidden_size, generator=gen).to(dev, self.dtype)  # (1, 1, C)
        key = torch.randn(1, s.num_kv_heads, past, s.head_dim, generator=gen).to(dev, self.dtype)
        pos = torch.full((1, 1), past, device=dev)

        layer_ms = [median_ms(lambda i=i: self.adapter.block(i, x, key, key, pos), dev, repeats)
                    for i in range(s.num_layers)]
        return layer_ms, median_ms(lambda: self.adapter.head(x), dev, repeats)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall ms of ``fn()`` over ``repeats`` calls after one warm-up (CUDA work waited for)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class NullExecutor(TorchExecutor):
    """A zero-cost model: what a step costs in the service when the model costs nothing.

    ``seamline bench throughput --null-executor`` serves with it to measure the framework's ceiling.
    Everything around the model runs as usual — the hops, the batching, the rows' dequantization, the KV
    extents — but the blocks, the head and the sampler are skipped: every row that samples gets token 0
    with logprob 0.
    """

    runs_model = False  # no pass runs the model: nothing to tune (cloud/matmul.py)

    def scratch_bytes(self, rows: list[Row]) -> int:
        return 0  # nothing is gathered: the budget holds no scratch for a pass that allocates none

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> tuple[list[Sample | None], float]:
        t0 = time.perf_counter()
        k = rows[0].session.split
        if k:
            _hidden_batch(rows)
        n = self.shape.num_layers - k
        if n:
            for r in rows:
                self.pool.ensure(r.session.id, n, r.session.capacity, r.session.position)
        samples = [Sample(0, 0.0) if r.sample else None for r in rows]
        return samples, (time.perf_counter() - t0) * 1e3


def _hidden_batch(rows: list[Row]) -> np.ndarray:
    """float32 (B, T, C) of the rows' hidden states: checked tensors dequantized in one call (codec)."""
    hidden = [r.hidden for r in rows]
    try:
        if all(isinstance(h, codec.Checked) for h in hidden):
            return codec.decode_batch(hidden)
        return np.stack([codec.dequantize(h) if isinstance(h, codec.Checked) else h for h in hidden])
    except codec.CodecError as e:
        raise InvalidArgument(f"bad hidden-state tensor: {e}") from None
