"""``TorchExecutor``: the back half (blocks k..L + head) of a batch of sessions, on one worker thread.

Every torch call runs on the executor's single worker thread (``await executor.run(fn, ...)``), so
the event loop never blocks and the KV buffers have one writer. The executor owns the KV cache
(``self.pool``, keyed by session id). A forward pass takes rows of the same split k and the same
chunk length T. Rows with different past lengths are batched by left-padding: for one layer at a
time, each row's KV is right-aligned in a (2, B, Hkv, Pmax, D) scratch tensor (counted against
--kv-budget while it exists), the attention mask hides the padding and each row gets its own
position ids, so a row sees exactly the keys it would see alone.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from seamline.partitioner.families import adapter_for

from .config import CloudConfig, ConfigError
from .kvpool import KVPool
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


class TorchExecutor:
    def __init__(self, model: torch.nn.Module, config: CloudConfig):
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.adapter = adapter_for(self.model)
        self.shape = self.adapter.shape
        if not self.shape.causal:
            raise ConfigError(f"{self.shape.family} is an encoder; seamline cloud serves causal language "
                              "models (GPT-2, Llama-family)")
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seamline-torch")
        self.pool = KVPool(self.shape, self.dtype, self.device)  # the KV of every session; worker writes

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{self.device.index or 0}"
        return str(self.device)

    def bytes_per_token(self, split: int) -> int:
        """KV bytes one position costs for layers split..L."""
        return self.pool.bytes_per_token(split)

    def scratch_bytes(self, rows: list[Row]) -> int:
        """Bytes of the padded copy ``forward(rows)`` will allocate (0 for a single row or no layers)."""
        if rows[0].session.split >= self.shape.num_layers:
            return 0
        return self.pool.scratch_bytes(len(rows), max(r.session.position for r in rows))

    # ---------------------------------------------------------------- worker thread only below

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> tuple[list[Sample | None], float]:
        """One forward pass over rows of the same split and chunk length; returns (samples, ms).

        Each session's buffer must have room for its new positions (``SessionStore.reserve``); a
        batch of several rows also needs ``scratch_bytes(rows)`` held (``SessionStore.hold_scratch``).
        """
        t0 = time.perf_counter()
        s, dev, pool = self.shape, self.device, self.pool
        k, t = rows[0].session.split, rows[0].tokens
        b, n = len(rows), s.num_layers - k
        starts = [r.session.position for r in rows]
        pmax = max(starts)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(t, device=dev)  # (B, T)
        if k == 0:
            ids = torch.from_numpy(np.stack([r.token_ids for r in rows])).to(dev)  # (B, T)
            x = self.adapter.embed(ids, pos).to(self.dtype)  # (B, T, C)
        else:
            x = torch.from_numpy(np.stack([r.hidden for r in rows])).to(dev, self.dtype)  # (B, T, C)
        if n:
            kvs = [pool.ensure(r.session.id, n, r.session.capacity, p) for r, p in zip(rows, starts, strict=True)]
            mask = scratch = None
            if b > 1:  # rows of different past lengths: left-pad one layer's past at a time
                mask = torch.zeros(b, pmax + t, dtype=torch.long, device=dev)  # (B, Pmax + T)
                for i, p in enumerate(starts):
                    mask[i, pmax - p:] = 1
                scratch = pool.new_scratch(b, pmax)  # (2, B, Hkv, Pmax, D), zero padding
            try:
                for j in range(n):
                    if b == 1:  # alone: attend to the session's own buffer, no copy
                        past_k, past_v = kvs[0][j, 0, None, :, :pmax], kvs[0][j, 1, None, :, :pmax]
                    else:
                        for i, (kv, p) in enumerate(zip(kvs, starts, strict=True)):
                            if p:
                                scratch[:, i, :, pmax - p:] = kv[j, :, :, :p]
                        past_k, past_v = scratch[0], scratch[1]
                    x, key, value = self.adapter.block(k + j, x, past_k, past_v, pos, mask)
                    for i, (kv, p) in enumerate(zip(kvs, starts, strict=True)):  # key: (B, Hkv, Pmax + T, D)
                        kv[j, 0, :, p:p + t] = key[i, :, pmax:]
                        kv[j, 1, :, p:p + t] = value[i, :, pmax:]
            finally:
                pool.drop_scratch()
        samples = sample_rows(self.adapter, rows, x, starts)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return samples, (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def measure_layer_ms(self, past: int = 16, repeats: int = 5) -> tuple[list[float], float]:
        """Median ms of each block and of the head for one decode token over ``past`` cached positions."""
        s, dev = self.shape, self.device
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 1, s.hidden_size, generator=gen).to(dev, self.dtype)  # (1, 1, C)
        key = torch.randn(1, s.num_kv_heads, past, s.head_dim, generator=gen).to(dev, self.dtype)
        pos = torch.full((1, 1), past, device=dev)

        def timed(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)

        layer_ms = [timed(lambda i=i: self.adapter.block(i, x, key, key, pos)) for i in range(s.num_layers)]
        head_ms = timed(lambda: self.adapter.head(x))
        return layer_ms, head_ms
