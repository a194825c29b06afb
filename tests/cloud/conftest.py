"""Shared fixtures: tiny random checkpoints, live servers on loopback, an edge stand-in in torch
(all from seamline.testing).

A server runs in a thread with its own event loop (``ServerThread``) so that one server can serve
many tests, each with its own client loop. Readiness is the health service answering SERVING.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from seamline.cloud.config import CloudConfig
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb
from seamline.testing.models import EdgeSim, byte_checkpoint, model_and_hash
from seamline.testing.models import reference_greedy as _reference_greedy
from seamline.testing.servers import ServerThread, wait_serving  # noqa: F401 - re-exported to the tests


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for seed, kind in enumerate(("gpt2", "llama", "qwen2"), start=1):
        out[kind] = byte_checkpoint(kind, root / kind, seed)
    return out


def cloud_config(model: Path, **overrides) -> CloudConfig:
    base = CloudConfig(model=str(model), host="127.0.0.1", port=0, device="cpu", max_sessions=64,
                       kv_budget=256 * 2**20, batch_window_ms=2.0, grace=2.0)
    return replace(base, **overrides)


@pytest.fixture(scope="session")
def servers(checkpoints):
    """One live server per family, shared by the tests that do not change limits."""
    started: dict[str, ServerThread] = {}
    try:
        for kind, path in checkpoints.items():
            started[kind] = ServerThread(cloud_config(path)).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def start_server(checkpoints):
    """Factory: a server with its own limits, stopped after the test."""
    started: list[ServerThread] = []

    def start(kind: str = "gpt2", credentials: grpc.ChannelCredentials | None = None, **overrides) -> ServerThread:
        server = ServerThread(cloud_config(checkpoints[kind], **overrides)).start(credentials)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def models(checkpoints) -> dict[str, tuple[torch.nn.Module, str]]:
    """The same checkpoints loaded in this process (reference outputs, edge stand-in): (model, hash)."""
    return {kind: model_and_hash(path) for kind, path in checkpoints.items()}


def step_request(start: int, k: int, ids: list[int] | None = None, hidden: np.ndarray | None = None,
                 sample: bool = True, cfg: codec.CodecConfig | None = None, step_id: int = 0) -> pb.StepRequest:
    req = pb.StepRequest(start_position=start, sample=sample, step_id=step_id)
    if k == 0:
        req.tokens.ids.extend(ids)
    else:
        req.hidden.CopyFrom(codec.encode(hidden, cfg or codec.CodecConfig()))
    return req


def open_request(model_hash: str, split: int, cfg: codec.CodecConfig | None = None, **sampling) -> pb.OpenRequest:
    req = pb.OpenRequest(model_hash=model_hash, split=split, sampling=pb.SamplingParams(**sampling))
    if cfg is not None:
        req.codec.CopyFrom(cfg.to_proto())
    return req


class Stream:
    """One open Generate stream (= one cloud session): write steps, read replies, close."""

    def __init__(self, call, opened: pb.OpenReply):
        self.call = call
        self.opened = opened
        self.session_id = opened.session_id
        self.max_chunk_tokens = opened.max_chunk_tokens

    async def write(self, req: pb.StepRequest) -> None:
        await self.call.write(pb.GenerateRequest(step=req))

    async def read(self) -> pb.StepReply:
        """The next step reply (raises grpc.aio.AioRpcError with the stream's status)."""
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            raise AssertionError(f"the stream ended: {await self.call.code()} {await self.call.details()}")
        assert reply.WhichOneof("kind") == "step", reply
        return reply.step

    async def step(self, req: pb.StepRequest) -> pb.StepReply:
        try:
            await self.write(req)
        except grpc.aio.AioRpcError:
            pass  # the server ended the call already: read() raises its status
        return await self.read()

    async def close(self) -> pb.CloseReply:
        """The explicit final message: the cloud answers with the bytes freed and ends the stream (OK)."""
        await self.call.write(pb.GenerateRequest(close=pb.CloseRequest()))
        reply = await self.call.read()
        assert reply.WhichOneof("kind") == "closed", reply
        assert await self.call.read() is grpc.aio.EOF and await self.call.code() == grpc.StatusCode.OK
        return reply.closed

    async def done_writing(self) -> None:
        """End the stream from this side (the cloud frees the session at once)."""
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF

    def cancel(self) -> None:
        self.call.cancel()


class Client:
    """A minimal async edge client: one channel, helpers to open a Generate stream and to generate."""

    def __init__(self, address: str, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.channel = (grpc.aio.secure_channel(address, credentials) if credentials
                        else grpc.aio.insecure_channel(address))
        self.stub = seamline_pb2_grpc.SeamlineStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def info(self) -> pb.InfoReply:
        return await self.stub.Info(pb.InfoRequest(), metadata=self.metadata)

    def raw(self):
        """A Generate call with nothing sent yet."""
        return self.stub.Generate(metadata=self.metadata)

    async def open_with(self, req: pb.OpenRequest) -> Stream:
        call = self.raw()
        try:
            await call.write(pb.GenerateRequest(open=req))
        except grpc.aio.AioRpcError:
            pass  # the server ended the call before reading (e.g. auth): read() raises its status
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise AssertionError(f"the stream ended: {await call.code()} {await call.details()}")
        assert reply.WhichOneof("kind") == "opened", reply
        return Stream(call, reply.opened)

    async def open(self, model_hash: str, split: int, cfg: codec.CodecConfig | None = None,
                   **sampling) -> Stream:
        """A new Generate stream whose first message opened a session (raises grpc.aio.AioRpcError)."""
        return await self.open_with(open_request(model_hash, split, cfg, **sampling))

    async def generate(self, model, mhash: str, k: int, prompt: list[int], new_tokens: int, chunk: int = 4,
                       cfg: codec.CodecConfig | None = None, **sampling) -> list[pb.StepReply]:
        """Prefill ``prompt`` in chunks, then decode; the edge feeds each token back; one stream."""
        stream = await self.open(mhash, k, cfg, **sampling)
        edge = EdgeSim(model, k)
        replies, position = [], 0
        pieces = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)]
        for n, piece in enumerate(pieces):
            hidden = None if k == 0 else edge.run(piece)
            reply = await stream.step(step_request(position, k, piece, hidden, sample=n == len(pieces) - 1,
                                                   cfg=cfg, step_id=n))
            position = reply.position
        replies.append(reply)
        while len(replies) < new_tokens and not reply.finished:
            token = [reply.token_id]
            hidden = None if k == 0 else edge.run(token)
            reply = await stream.step(step_request(position, k, token, hidden, cfg=cfg, step_id=position))
            position = reply.position
            replies.append(reply)
        await stream.close()
        return replies


def reference_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the unsplit model, recomputing the full sequence each step; and their logits."""
    return _reference_greedy(model, prompt, new_tokens, with_logits=True)


def status_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()
