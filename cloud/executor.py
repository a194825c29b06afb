"""``TorchExecutor``: the back half (blocks k..L + head) of a batch of sessions, on one worker thread.

Every torch call runs on the executor's single worker thread (``await executor.run(fn, ...)``), so
the event loop never blocks and the session KV buffers have one writer. A forward pass takes rows
of the same split k and the same chunk length T. Rows with different past lengths are batched by
left-padding: each row's KV is right-aligned in a (B, Hkv, Pmax, D) tensor, the attention mask
hides the padding and each row gets its own position ids, so a row sees exactly the keys it
would see alone.
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
from .messages import Row
from .sampling import Sample, sample
from .sessions import Session

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

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{self.device.index or 0}"
        return str(self.device)

    def bytes_per_token(self, split: int) -> int:
        """KV bytes one position costs for layers split..L."""
        s = self.shape
        return (s.num_layers - split) * 2 * s.num_kv_heads * s.head_dim * self.dtype.itemsize

    # ---------------------------------------------------------------- worker thread only below

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> tuple[list[Sample | None], float]:
        """One forward pass over rows of the same split and chunk length; returns (samples, ms)."""
        t0 = time.perf_counter()
        s, dev = self.shape, self.device
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
            for r in rows:
                self._ensure_buffer(r.session, n)
            if b == 1:  # alone: attend to the session's own buffer, no padding
                past = rows[0].session.kv[:, :, None, :, :pmax]  # (n, 2, 1, Hkv, P, D)
                mask = None
            else:
                past = torch.zeros(n, 2, b, s.num_kv_heads, pmax, s.head_dim, dtype=self.dtype, device=dev)
                mask = torch.zeros(b, pmax + t, dtype=torch.long, device=dev)  # (B, Pmax + T)
                for i, (r, p) in enumerate(zip(rows, starts, strict=True)):
                    if p:
                        past[:, :, i, :, pmax - p:] = r.session.kv[:, :, :, :p]
                    mask[i, pmax - p:] = 1
            new = torch.empty(n, 2, b, s.num_kv_heads, t, s.head_dim, dtype=self.dtype, device=dev)
            for j in range(n):
                x, key, value = self.adapter.block(k + j, x, past[j, 0], past[j, 1], pos, mask)
                new[j, 0], new[j, 1] = key[:, :, pmax:], value[:, :, pmax:]  # (B, Hkv, T, D)
            for i, (r, p) in enumerate(zip(rows, starts, strict=True)):
                r.session.kv[:, :, :, p:p + t] = new[:, :, i]
        samples: list[Sample | None] = [None] * b
        wanted = [i for i, r in enumerate(rows) if r.sample]
        if wanted:
            logits = self.adapter.head(x[wanted, -1:, :])[:, -1].float().cpu()  # (S, V)
            for row_logits, i in zip(logits, wanted, strict=True):
                session = rows[i].session
                samples[i] = sample(row_logits, session.sampling, session.rng, starts[i] + t)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return samples, (time.perf_counter() - t0) * 1e3

    def _ensure_buffer(self, session: Session, n_layers: int) -> None:
        """Grow the session's KV buffer to the capacity the store reserved, keeping cached positions."""
        kv = session.kv
        if kv is not None and kv.shape[3] >= session.capacity:
            return
        s = self.shape
        grown = torch.empty(n_layers, 2, s.num_kv_heads, session.capacity, s.head_dim, dtype=self.dtype,
                            device=self.device)  # (n, 2, Hkv, capacity, D)
        if kv is not None and session.position:
            grown[:, :, :, :session.position] = kv[:, :, :, :session.position]
        session.kv = grown

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
