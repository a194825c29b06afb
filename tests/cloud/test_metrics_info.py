"""Info reports the model, per-layer latency and load; Prometheus metrics count the traffic."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb

from .conftest import Client, step_request
from .test_errors import expect


async def test_info(servers, models):
    _, mhash = models["qwen2"]
    async with Client(servers["qwen2"].address) as client:
        info = await client.info()
    assert (info.model_hash, info.family, info.num_layers, info.hidden_size) == (mhash, "llama", 4, 64)
    assert (info.vocab_size, info.max_positions, info.min_split, info.max_split) == (256, 128, 0, 4)
    assert len(info.layer_ms) == 4 and all(ms > 0 for ms in info.layer_ms) and info.head_ms > 0
    assert set(info.codecs) == {codec.codec_enum(name) for name in codec.CODEC_NAMES}  # the registry's
    assert set(info.codecs) >= {pb.FP32, pb.FP16, pb.INT8, pb.INT4, pb.INT4_ROT, pb.INT8_OUTLIER}
    assert info.device == "cpu" and info.max_chunk_tokens == 256
    assert info.load.max_sessions == 64 and info.load.kv_budget_bytes == 256 * 2**20


async def test_reflection_lists_the_services(servers):
    async with grpc.aio.insecure_channel(servers["gpt2"].address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"seamline.v1.Seamline", "grpc.health.v1.Health"} <= names


async def test_prometheus_metrics(start_server, models):
    model, mhash = models["gpt2"]
    server = start_server("gpt2", metrics_port=0)
    async with Client(server.address) as client:
        await client.generate(model, mhash, 2, [1, 2, 3, 4], 3)
        stream = await client.open(mhash, 0)
        await stream.step(step_request(0, 0, [1, 2]))
        await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.step(step_request(2, 0, [999])))
        port = server.running.metrics_port
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    values = {}
    for line in text.splitlines():
        if line.startswith("seamline_cloud_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["seamline_cloud_active_sessions"] == 0  # the failed stream freed its session
    assert values["seamline_cloud_kv_bytes"] == 0
    assert values['seamline_cloud_steps_total{kind="decode"}'] == 2
    assert values['seamline_cloud_steps_total{kind="prefill"}'] == 2
    assert values['seamline_cloud_batch_size_count{kind="decode"}'] == 2
    assert values['seamline_cloud_errors_total{code="INVALID_ARGUMENT"}'] == 1
    assert values['seamline_cloud_bytes_in_total{rpc="Step"}'] > 4 * 64 * 4
    assert values["seamline_cloud_queue_seconds_count"] == 4
    assert values['seamline_cloud_compute_seconds_count{kind="prefill"}'] == 2
