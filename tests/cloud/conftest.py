"""Shared fixtures: tiny random checkpoints, live servers on loopback, an edge stand-in in torch.

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
from seamline.partitioner.loading import load_model, model_hash
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from ..cloudkit import EdgeSim, ServerThread, wait_serving  # noqa: F401 - re-exported to the tests

VOCAB = 256


def _build(kind: str, path: Path) -> None:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed({"gpt2": 1, "llama": 2, "qwen2": 3}[kind])
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=128, **common))
    elif kind == "llama":  # grouped-query attention: 4 heads, 2 KV heads
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, **common))
    else:  # qwen2: q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, use_sliding_window=False, **common))
    model.save_pretrained(path)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kind in ("gpt2", "llama", "qwen2"):
        _build(kind, root / kind)
        out[kind] = root / kind
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
    return {kind: (load_model(path)[0], model_hash(path)) for kind, path in checkpoints.items()}


def step_request(session_id: str, start: int, k: int, ids: list[int] | None = None,
                 hidden: np.ndarray | None = None, sample: bool = True, cfg: codec.CodecConfig | None = None,
                 step_id: int = 0) -> pb.StepRequest:
    req = pb.StepRequest(session_id=session_id, start_position=start, sample=sample, step_id=step_id)
    if k == 0:
        req.tokens.ids.extend(ids)
    else:
        req.hidden.CopyFrom(codec.encode(hidden, cfg or codec.CodecConfig()))
    return req


class Client:
    """A minimal async edge client: one channel, helpers to open and to generate."""

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

    async def open(self, model_hash: str, split: int, cfg: codec.CodecConfig | None = None,
                   **sampling) -> pb.OpenReply:
        req = pb.OpenRequest(model_hash=model_hash, split=split, sampling=pb.SamplingParams(**sampling))
        if cfg is not None:
            req.codec.CopyFrom(cfg.to_proto())
        return await self.stub.Open(req, metadata=self.metadata)

    async def close(self, session_id: str) -> pb.CloseReply:
        return await self.stub.Close(pb.CloseRequest(session_id=session_id), metadata=self.metadata)

    def stream(self):
        return self.stub.Step(metadata=self.metadata)

    async def step(self, req: pb.StepRequest) -> pb.StepReply:
        """One request on a fresh stream (raises grpc.aio.AioRpcError)."""
        call = self.stream()
        try:
            await call.write(req)
        except grpc.aio.AioRpcError:
            pass  # the server ended the call before reading (e.g. auth): read() raises its status
        reply = await call.read()
        await call.done_writing()
        return reply

    async def generate(self, model, mhash: str, k: int, prompt: list[int], new_tokens: int, chunk: int = 4,
                       cfg: codec.CodecConfig | None = None, **sampling) -> list[pb.StepReply]:
        """Prefill ``prompt`` in chunks, then decode; the edge feeds each token back."""
        session = (await self.open(mhash, k, cfg, **sampling)).session_id
        edge = EdgeSim(model, k)
        call = self.stream()
        replies, position = [], 0
        pieces = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)]
        for n, piece in enumerate(pieces):
            hidden = None if k == 0 else edge.run(piece)
            await call.write(step_request(session, position, k, piece, hidden, sample=n == len(pieces) - 1,
                                          cfg=cfg, step_id=n))
            reply = await call.read()
            position = reply.position
        replies.append(reply)
        while len(replies) < new_tokens and not reply.finished:
            token = [reply.token_id]
            hidden = None if k == 0 else edge.run(token)
            await call.write(step_request(session, position, k, token, hidden, cfg=cfg, step_id=position))
            reply = await call.read()
            position = reply.position
            replies.append(reply)
        await call.done_writing()
        await self.close(session)
        return replies


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the unsplit model, recomputing the full sequence each step; and their logits."""
    ids, tokens, logits = list(prompt), [], []
    for _ in range(new_tokens):
        row = model(torch.tensor([ids])).logits[0, -1]
        tokens.append(int(torch.argmax(row)))
        logits.append(row)
        ids.append(tokens[-1])
    return tokens, logits


def status_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()
