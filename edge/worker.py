"""``ComputeWorker``: the one thread that runs ONNX Runtime (and codec encoding) for the agent.

The event loop never blocks on a forward pass: it submits a job and awaits it, and meanwhile
serves HTTP and moves bytes over gRPC. One thread, because the ORT sessions are tuned for a small
device (see ``runtime.session_options``): concurrent requests interleave job by job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class ComputeWorker:
    def __init__(self, name: str = "seamline-ort"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.last_end = 0.0  # perf_counter when the latest job ended (written on the worker thread)

    async def run(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """Run ``fn(*args)`` on the worker thread; returns (result, milliseconds it ran)."""
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args) -> asyncio.Future[tuple[T, float]]:
        """Queue ``fn(*args)`` on the worker thread now (call from the event loop); the future gives (result,
        milliseconds it ran). For a caller that has work of its own to do while the job runs."""
        return asyncio.wrap_future(self.queue(fn, *args))

    def queue(self, fn: Callable[..., T], *args) -> Future[tuple[T, float]]:
        """``submit`` from any thread, a job on the worker included (it runs after the current one): a
        ``concurrent.futures.Future``; the event loop awaits it through ``asyncio.wrap_future``."""
        def timed():
            t0 = time.perf_counter()
            try:
                out = fn(*args)
            finally:
                self.last_end = time.perf_counter()
            return out, (self.last_end - t0) * 1e3

        return self._pool.submit(timed)

    def later(self, fn: Callable[..., object], *args) -> None:
        """Queue ``fn(*args)`` behind the jobs already submitted, without waiting for it (clean-up that must
        not run while another job uses the same sessions); nothing happens once the worker is shut down."""
        def logged():
            try:
                fn(*args)
            except Exception:  # clean-up never fails a caller that did not wait for it
                log.exception("a queued clean-up job failed")
            finally:
                self.last_end = time.perf_counter()

        try:
            self._pool.submit(logged)
        except RuntimeError:  # shut down: the process is ending
            pass

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
