"""``SerialWorker``: one worker thread whose short jobs may run on the caller's thread, but only when it is idle,
so jobs still run one at a time and in the order they were handed over."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
from seamline.edge.worker import ComputeWorker, SerialWorker


@pytest.fixture
def worker():
    w = SerialWorker("test-worker")
    yield w
    w.shutdown(wait=True)


class Holder:
    """A job that holds the worker thread until ``release``; ``started`` is set once it runs."""

    def __init__(self):
        self.gate, self.started = threading.Event(), threading.Event()

    def __call__(self):
        self.started.set()
        self.gate.wait(10)

    def release(self):
        self.gate.set()


def test_an_idle_worker_lets_the_caller_run_the_job(worker):
    ran, out = worker.run_if_idle(lambda: threading.current_thread())
    assert ran and out is threading.current_thread()
    assert worker.submit(lambda: threading.current_thread()).result(10) is not threading.current_thread()


def test_a_busy_worker_keeps_the_job(worker):
    hold = Holder()
    held = worker.submit(hold)
    hold.started.wait(10)
    calls = []
    assert worker.run_if_idle(calls.append, 1) == (False, None)  # one running
    queued = worker.submit(lambda: "queued")
    assert worker.run_if_idle(calls.append, 2) == (False, None)  # one running, one queued behind it
    hold.release()
    held.result(10)
    assert queued.result(10) == "queued"
    assert worker.run_if_idle(calls.append, 3) == (True, None)
    assert calls == [3]


def test_a_job_handed_over_while_the_caller_runs_one_waits_for_it(worker):
    order, later = [], []

    def on_caller():
        order.append("caller starts")
        later.append(worker.submit(order.append, "worker job"))  # another hand-over meanwhile
        # the worker thread is free and would run it now if it could
        assert not concurrent.futures.wait(later, timeout=0.2).done
        order.append("caller ends")

    assert worker.run_if_idle(on_caller)[0]
    later[0].result(10)
    assert order == ["caller starts", "caller ends", "worker job"]


def test_a_job_cancelled_before_it_ran_leaves_the_worker_idle(worker):
    hold = Holder()
    held = worker.submit(hold)
    hold.started.wait(10)
    queued = worker.submit(lambda: "never")
    assert queued.cancel()
    hold.release()
    held.result(10)
    assert worker.run_if_idle(lambda: "here") == (True, "here")


def test_an_exception_on_the_caller_propagates_and_leaves_the_worker_usable(worker):
    def boom():
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        worker.run_if_idle(boom)
    assert worker.run_if_idle(lambda: 7) == (True, 7)
    with pytest.raises(ValueError):
        worker.submit(boom).result(10)
    assert worker.run_if_idle(lambda: 8) == (True, 8)


def test_run_in_executor_counts_as_a_job(worker):
    async def main():
        hold = Holder()
        held = asyncio.get_running_loop().run_in_executor(worker, hold)
        await asyncio.to_thread(hold.started.wait, 10)
        busy = worker.run_if_idle(lambda: 1)
        hold.release()
        await held
        return busy, worker.run_if_idle(lambda: 2)

    assert asyncio.run(main()) == ((False, None), (True, 2))


def test_a_shut_down_worker_runs_nothing_more_on_the_caller_either():
    w = SerialWorker("test-worker")
    w.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        w.submit(lambda: 1)
    assert w.run_if_idle(lambda: 3) == (False, None)


# ------------------------------------------------------------------ ComputeWorker.submit(..., short=True)

async def test_a_short_job_on_an_idle_worker_is_done_when_submit_returns():
    cw = ComputeWorker("test-ort")
    try:
        future = cw.submit(threading.current_thread, short=True)
        assert future.done()
        thread, ms = await future
        assert thread is threading.current_thread() and ms >= 0 and cw.last_end > 0

        def boom():
            raise ValueError("bad row")

        failed = cw.submit(boom, short=True)
        assert failed.done()
        with pytest.raises(ValueError, match="bad row"):
            await failed
    finally:
        cw.shutdown()


async def test_a_short_job_waits_behind_a_job_the_worker_queued_for_itself():
    """The local decode loop's pattern: a job on the worker queues the next one from the worker thread; a short
    job handed over in between must not overtake it."""
    cw = ComputeWorker("test-ort")
    order, gate = [], threading.Event()
    try:
        def second():
            gate.wait(10)
            order.append("queued by the worker")

        def first():
            order.append("first")
            return cw.queue(second)

        queued, _ = await cw.submit(first)
        short = cw.submit(order.append, "short", short=True)
        assert not short.done()  # the queued job is still ahead of it: on the worker, in order
        gate.set()
        await asyncio.wrap_future(queued)
        _, _ = await short
        assert order == ["first", "queued by the worker", "short"]
        assert (await cw.submit(threading.current_thread, short=True))[0] is threading.current_thread()
    finally:
        gate.set()
        cw.shutdown()
