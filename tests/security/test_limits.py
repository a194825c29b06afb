"""Limits as a defence: what a device (or a stranger) can take from the others.

The cloud bounds sessions (--max-sessions), KV bytes (--kv-budget), tokens per chunk and message
size for the whole server; tests/cloud/test_limits.py checks each limit. Here: the limits hold
against callers without a valid token, and — a gap today — one device can take every session.
"""

from __future__ import annotations

import grpc
import pytest
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc
from seamline.testing.servers import write_tokens

from ..faults.live import HIDDEN, ServerThread, SyncStream, cloud_config, generate_call

MAX_SESSIONS = 4
A, B = "tok-a-0c1d", "tok-b-77e0"


@pytest.fixture(scope="module")
def server(sec_checkpoint, tmp_path_factory):
    tokens = write_tokens(tmp_path_factory.mktemp("limits") / "tokens.txt", {A: "phone-a", B: "phone-b"})
    running = ServerThread(cloud_config(sec_checkpoint, auth_tokens=str(tokens), max_sessions=MAX_SESSIONS,
                                        max_sessions_per_device=MAX_SESSIONS - 1, max_chunk_tokens=16)).start()
    yield running
    running.stop()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield seamline_pb2_grpc.SeamlineStub(channel)
    assert server.call(lambda: len(server.running.store)) == 0, "a test left sessions open"


def _open(stub, mhash: str, token: str | None) -> SyncStream:
    return SyncStream.opened(stub, mhash, token)


def test_strangers_take_no_sessions_and_no_bytes(server, stub, sec_model):
    _, mhash = sec_model
    for _ in range(3 * MAX_SESSIONS):
        with pytest.raises(grpc.RpcError) as info:
            _open(stub, mhash, "tok-guess")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.call(lambda: len(server.running.store)) == 0
    # the message-size limit holds before authentication: a stranger's huge message is refused whole
    max_message = 16 * HIDDEN * 4 + (1 << 16)
    for huge in (pb.GenerateRequest(open=pb.OpenRequest(model_hash="f" * (2 * max_message), split=2)),
                 pb.GenerateRequest(step=pb.StepRequest(hidden=pb.Tensor(payload=bytes(2 * max_message))))):
        with pytest.raises(grpc.RpcError) as info:
            generate_call(stub, [huge])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # and every device still gets its sessions
    for stream in [_open(stub, mhash, A), _open(stub, mhash, B)]:
        stream.end()


def test_one_device_cannot_take_every_session(server, stub, sec_model):
    _, mhash = sec_model
    mine: list[SyncStream] = []
    try:
        while len(mine) < MAX_SESSIONS:  # device A opens what it can
            try:
                mine.append(_open(stub, mhash, A))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-sessions-per-device" in e.details()
                break
        _open(stub, mhash, B).end()  # device B must still get one
    finally:
        for stream in mine:
            stream.end()
