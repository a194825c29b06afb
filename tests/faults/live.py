"""Live cloud servers for the fault, hostile-input and security tests (shared with tests/security);
the launchers, the checkpoint factory and the edge stand-in come from seamline.testing.

- ``tiny_gpt2(path)``: a 4-layer, 64-wide random GPT-2 (vocab 256, 128 positions) saved like a real
  checkpoint; the server and the test load the same weights.
- ``CloudProcess``: ``python -m seamline cloud`` in a subprocess on loopback port 0, ready when the
  health service answers SERVING; keeps its output and reads its RSS from /proc.
- ``ServerThread``: ``serve(config)`` in this process on an event loop of its own thread (for
  tests that inspect state or capture logs with a logging handler).
- ``EdgeSim`` and ``greedy_session``: the edge's half in torch and one greedy generation through
  the synchronous gRPC API (one Generate stream), to check that a healthy session's tokens do not
  change; ``open_message``, ``step_message``, ``generate_call``: the messages of a Generate stream.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path

from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb
from seamline.testing.models import EdgeSim, model_and_hash, reference_greedy, tiny_gpt2  # noqa: F401 - re-exported
from seamline.testing.procs import CloudProcess, rss_mb  # noqa: F401 - re-exported
from seamline.testing.servers import SERVING, ServerThread, health_status, wait_serving  # noqa: F401 - re-exported
from seamline.testing.servers import cloud_config as testing_cloud_config

VOCAB = 256
HIDDEN = 64
LAYERS = 4
MAX_POSITIONS = 128
GENERATE_METHOD = "/seamline.v1.Seamline/Generate"


# -------------------------------------------------------------------------------------- servers


def cloud_config(model: Path, **overrides):
    """seamline.testing.servers.cloud_config with this suite's limits (64 sessions, 64 MiB of KV)."""
    return testing_cloud_config(model, **{"max_sessions": 64, "kv_budget": 64 * 2**20, "batch_window_ms": 2.0,
                                          "grace": 2.0, **overrides})


# ------------------------------------------------------------------------------------- the edge


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def open_message(mhash: str, split: int = 2, cfg: codec.CodecConfig | None = None) -> pb.GenerateRequest:
    req = pb.OpenRequest(model_hash=mhash, split=split)
    if split and cfg is not None:
        req.codec.CopyFrom(cfg.to_proto())
    return pb.GenerateRequest(open=req)


def step_message(start: int, hidden: pb.Tensor | None = None, ids: Sequence[int] | None = None,
                 sample: bool = True, step_id: int = 0) -> pb.GenerateRequest:
    req = pb.StepRequest(start_position=start, sample=sample, step_id=step_id)
    if hidden is not None:
        req.hidden.CopyFrom(hidden)
    if ids is not None:
        req.tokens.ids.extend(ids)
    return pb.GenerateRequest(step=req)


def generate_call(stub: seamline_pb2_grpc.SeamlineStub, messages: Sequence[pb.GenerateRequest],
                  token: str | None = None, timeout: float = 30) -> list[pb.GenerateReply]:
    """One Generate stream carrying ``messages`` (then half-closed): every reply, or the status raised."""
    return list(stub.Generate(iter(messages), metadata=metadata(token), timeout=timeout))


class SyncStream:
    """A Generate stream driven one message at a time from a synchronous test."""

    def __init__(self, stub: seamline_pb2_grpc.SeamlineStub, first: pb.GenerateRequest, token: str | None = None,
                 timeout: float = 60):
        self.queue: queue.Queue = queue.Queue()
        self.queue.put(first)
        self.replies = stub.Generate(iter(self.queue.get, None), metadata=metadata(token), timeout=timeout)

    @classmethod
    def opened(cls, stub, mhash: str, token: str | None = None, split: int = 2) -> SyncStream:
        """A stream whose open was answered (raises grpc.RpcError when refused)."""
        stream = cls(stub, open_message(mhash, split), token)
        assert next(stream.replies).WhichOneof("kind") == "opened"
        return stream

    def ask(self, message: pb.GenerateRequest) -> pb.GenerateReply:
        self.queue.put(message)
        return next(self.replies)

    def end(self) -> None:
        """Half-close; the cloud frees the session and ends the stream with OK."""
        self.queue.put(None)
        assert next(self.replies, None) is None


def greedy_session(stub: seamline_pb2_grpc.SeamlineStub, model, mhash: str, prompt: Sequence[int], new_tokens: int,
                   k: int = 2, cfg: codec.CodecConfig | None = None, token: str | None = None,
                   timeout: float = 60) -> list[int]:
    """One Generate stream: open, prefill ``prompt``, decode ``new_tokens - 1`` more greedily, end."""
    cfg = cfg or codec.CodecConfig()
    md = metadata(token)
    edge = EdgeSim(model, k)
    requests: list[pb.GenerateRequest | None] = []
    cond = threading.Condition()

    def feed():
        sent = 0
        while True:
            with cond:
                cond.wait_for(lambda n=sent: len(requests) > n)
                req = requests[sent]
            if req is None:
                return  # half-close: the cloud frees the session at once
            sent += 1
            yield req

    def push(req):
        with cond:
            requests.append(req)
            cond.notify()

    tokens: list[int] = []
    push(open_message(mhash, k, cfg))
    push(step_message(0, codec.encode(edge.run(prompt), cfg)))
    replies = stub.Generate(feed(), metadata=md, timeout=timeout)
    try:
        for reply in replies:
            if reply.WhichOneof("kind") != "step":
                continue  # the open's answer
            step = reply.step
            tokens.append(step.token_id)
            if len(tokens) >= new_tokens or step.finished:
                push(None)
                continue
            push(step_message(step.position, codec.encode(edge.run([step.token_id]), cfg), step_id=len(tokens)))
    finally:
        push(None)
    return tokens
