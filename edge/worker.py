"""``ComputeWorker``: the one thread that runs ONNX Runtime (and codec encoding) for the agent.

The event loop does not block on a forward pass: it submits a job and awaits it, and meanwhile
serves HTTP and moves bytes over gRPC. One thread, because the ORT sessions are tuned for a small
device (see ``runtime.session_options``): concurrent requests interleave job by job. The exception is
a job its caller knows to be short (``submit(..., short=True)``: a decode row that took under
``SHORT_JOB_MS`` last time) while the worker is idle: it runs on the event loop, which saves the two
thread hops around it (``SerialWorker``; ``seamline bench overhead``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# A job expected under this may run on the event loop when the worker is idle. "Expected": the last one like it
# took that long; a rare one-off inside one (the rotary table or a KV buffer growing) then holds the loop too.
SHORT_JOB_MS = 2.0


class SerialWorker(ThreadPoolExecutor):
    """One worker thread that knows when it is idle, so a short job can skip the hop to it.

    Handing a job to a worker thread and its result back to the event loop costs two thread wake-ups (0.1-0.2 ms
    each on the build machine); for a job of a millisecond that is a large share. ``run_if_idle`` runs a job
    on the calling thread instead, but only when no job is queued or running, so jobs still run one at a time
    and in the order they were handed over (a job handed over by another thread while one runs on the caller
    waits for it). Every way in (``submit``, ``run_in_executor``, ``run_if_idle``) is counted, and a job
    leaves the count when it ends or is cancelled before it starts. Once shut down, nothing runs on the
    caller either.
    """

    def __init__(self, thread_name_prefix: str):
        super().__init__(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self._jobs = 0  # handed over, not finished
        self._closed = False
        self._one_at_a_time = threading.Lock()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._count_lock:
            self._jobs += 1

        def job():
            try:
                with self._one_at_a_time:
                    return fn(*args, **kwargs)
            finally:
                self._done()  # before the future's result is set: its waiter finds the worker idle

        try:
            future = super().submit(job)
        except BaseException:  # shut down: nothing was queued
            self._done()
            raise
        future.add_done_callback(self._if_cancelled)  # a job cancelled before it ran never reaches job()
        return future

    def _if_cancelled(self, future: Future) -> None:
        if future.cancelled():
            self._done()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._count_lock:
            self._closed = True
        super().shutdown(wait=wait, cancel_futures=cancel_futures)

    def run_if_idle(self, fn: Callable[..., T], *args) -> tuple[bool, T | None]:
        """``(True, fn(*args))`` run on this thread when no job is queued or running; else ``(False, None)``
        at once (hand the job to ``submit`` then: after ``shutdown`` it raises RuntimeError there). An
        exception from ``fn`` propagates."""
        with self._count_lock:
            if self._jobs or self._closed:
                return False, None
            self._jobs += 1
        try:
            with self._one_at_a_time:
                return True, fn(*args)
        finally:
            self._done()

    def _done(self) -> None:
        with self._count_lock:
            self._jobs -= 1


class ComputeWorker:
    def __init__(self, name: str = "seamline-ort"):
        self._pool = SerialWorker(name)
        self.last_end = 0.0  # perf_counter when the latest job ended (written by whichever thread ran it)

    async def run(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """Run ``fn(*args)`` on the worker thread; returns (result, milliseconds it ran)."""
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args, short: bool = False) -> asyncio.Future[tuple[T, float]]:
        """Queue ``fn(*args)`` on the worker thread now (call from the event loop); the future gives (result,
        milliseconds it ran). For a caller that has work of its own to do while the job runs. ``short``: the
        caller expects the job to take under ``SHORT_JOB_MS``; if the worker is idle it runs here and now, and
        the future is done when this returns (an exception from the job is in it, as from the worker)."""
        timed = self._timed(fn, *args)
        if short:
            future = asyncio.get_running_loop().create_future()
            try:
                ran, out = self._pool.run_if_idle(timed)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting caller, as the worker would
                future.set_exception(e)
                return future
            if ran:
                future.set_result(out)
                return future
        return asyncio.wrap_future(self._pool.submit(timed))

    def queue(self, fn: Callable[..., T], *args) -> Future[tuple[T, float]]:
        """``submit`` from any thread, a job on the worker included (it runs after the current one): a
        ``concurrent.futures.Future``; the event loop awaits it through ``asyncio.wrap_future``."""
        return self._pool.submit(self._timed(fn, *args))

    def _timed(self, fn: Callable[..., T], *args) -> Callable[[], tuple[T, float]]:
        def timed():
            t0 = time.perf_counter()
            try:
                out = fn(*args)
            finally:
                self.last_end = time.perf_counter()
            return out, (self.last_end - t0) * 1e3

        return timed

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
