"""``SerialWorker``: one worker thread whose short jobs may run on the caller's thread, but only when it is idle,
so jobs still run one at a time and in the order they were handed over."""

from __future__ import annotations

import asyncio
import threading

import pytest
from seamline.edge.worker import SerialWorker


@pytest.fixture
def worker():
    w = SerialWorker("test-worker")
    yield w
    w.shutdown(wait=True)


def test_an_idle_worker_lets_the_caller_run_the_job(worker):
    ran, out = worker.run_if_idle(lambda: threading.current_thread())
    assert ran and out is threading.current_thread()
    assert worker.submit(lambda: threading.current_thread()).result(10) is not threading.current_thread()


def test_a_busy_worker_keeps_the_job(worker):
    gate, started = threading.Event(), threading.Event()

    def hold():
        started.set()
        gate.wait(10)

    held = worker.submit(hold)
    started.wait(10)
    calls = []
    assert worker.run_if_idle(calls.append, 1) == (False, None)  # one running
    queued = worker.submit(lambda: "queued")
    assert worker.run_if_idle(calls.append, 2) == (False, None)  # one running, one queued behind it
    gate.set()
    held.result(10)
    assert queued.result(10) == "queued"
    assert worker.run_if_idle(calls.append, 3) == (True, None)
    assert calls == [3]


def test_a_job_handed_over_while_the_caller_runs_one_waits_for_it(worker):
    order, inside = [], threading.Event()
    later: list = []

    def on_caller():
        order.append("caller starts")
        later.append(worker.submit(order.append, "worker job"))  # another hand-over meanwhile
        inside.wait(0.2)  # the worker thread is free and would run it now if it could
        order.append("caller ends")

    assert worker.run_if_idle(on_caller)[0]
    later[0].result(10)
    assert order == ["caller starts", "caller ends", "worker job"]


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
        gate, started = threading.Event(), threading.Event()

        def hold():
            started.set()
            gate.wait(10)

        held = asyncio.get_running_loop().run_in_executor(worker, hold)
        await asyncio.to_thread(started.wait, 10)
        busy = worker.run_if_idle(lambda: 1)
        gate.set()
        await held
        return busy, worker.run_if_idle(lambda: 2)

    assert asyncio.run(main()) == ((False, None), (True, 2))


def test_a_shut_down_worker_refuses_hand_overs_and_still_counts_right():
    w = SerialWorker("test-worker")
    w.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        w.submit(lambda: 1)
    assert w.run_if_idle(lambda: 3) == (True, 3)
