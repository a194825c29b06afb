"""``ComputeWorker``: the one thread that runs ONNX Runtime (and codec encoding) for the agent.

The event loop never blocks on a forward pass: it submits a job and awaits it, and meanwhile
serves HTTP and moves bytes over gRPC. One thread, because the ORT sessions are tuned for a small
device (see ``runtime.session_options``): concurrent requests interleave job by job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ComputeWorker:
    def __init__(self, name: str = "seamline-ort"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """Run ``fn(*args)`` on the worker thread; returns (result, milliseconds it ran)."""
        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            return out, (time.perf_counter() - t0) * 1e3

        out, ms = await asyncio.get_running_loop().run_in_executor(self._pool, timed)
        return out, ms

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
