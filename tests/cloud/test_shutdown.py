"""Graceful shutdown: in-flight steps finish, new work is refused, the server exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from seamline.cloud.server import serve
from seamline.testing.procs import CloudProcess

from .conftest import Client, EdgeSim, cloud_config, reference_greedy, step_request, wait_serving
from .test_errors import expect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def test_drain_finishes_in_flight_step_and_refuses_new_work(checkpoints, models):
    model, mhash = models["gpt2"]
    running = await serve(cloud_config(checkpoints["gpt2"], grace=30.0))
    address = f"127.0.0.1:{running.port}"
    try:
        async with Client(address) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            request = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(request, wait_for_ready=True)).status == health_pb2.HealthCheckResponse.SERVING
            stream = await client.open(mhash, 2)
            other = await client.open(mhash, 2)
            gate = threading.Event()
            blocker = running.executor.worker.submit(gate.wait)  # hold the worker: the next step stays in flight
            edge = EdgeSim(model, 2)
            await stream.write(step_request(0, 2, hidden=edge.run([5, 6, 7])))
            while running.scheduler.in_flight == 0:
                await asyncio.sleep(0.005)  # a condition: the step reached the scheduler
            stopping = asyncio.create_task(running.stop())
            while not running.service.draining:
                await asyncio.sleep(0.005)
            assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await expect(grpc.StatusCode.UNAVAILABLE, client.open(mhash, 2), "draining")
            await expect(grpc.StatusCode.UNAVAILABLE,
                         other.step(step_request(0, 2, hidden=EdgeSim(model, 2).run([1]))), "draining")
            gate.set()
            blocker.result()
            reply = await stream.read()  # the in-flight step completes
            assert reply.position == 3 and reply.token_id == reference_greedy(model, [5, 6, 7], 1)[0][0]
            await stream.done_writing()
            await asyncio.wait_for(stopping, 30)
            assert all(task.done() for task in running.tasks)
            await expect(grpc.StatusCode.UNAVAILABLE, client.info())
    finally:
        await running.stop(grace=0)


def test_cli_serves_health_and_exits_on_sigterm(checkpoints):
    cloud = CloudProcess(checkpoints["llama"], log_level=None, one_thread=False, grace=2)
    try:
        wait_serving(cloud.wait_for(r"listening on (\S+) \(model llama, device cpu\)", 120).group(1))
        cloud.proc.send_signal(signal.SIGTERM)
        assert cloud.wait(30) == 0
        assert "stopped" in cloud.output
    finally:
        cloud.stop()


def test_cli_help_and_bad_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "seamline.cloud.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 0 and "--kv-budget" in out.stdout and "--auth-tokens" in out.stdout
    out = subprocess.run([sys.executable, "-m", "seamline.cloud.cli", "--model", str(tmp_path / "missing"),
                          "--port", "0"], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 2 and "no such folder" in out.stderr
    out = subprocess.run([sys.executable, "-m", "seamline.cloud.cli", "--kv-budget", "lots"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 2 and "2GiB" in out.stderr
