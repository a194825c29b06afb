"""Who may do what: bearer tokens on every RPC, sessions reachable only through their own stream,
random session ids.

tests/cloud/test_auth.py already checks Info and an open without a token or with a wrong one. This
file adds what it leaves out: every malformed authorization header on Info and Generate (a step as
the first message included), that device B's streams (a rewind included) leave device A's session
and tokens untouched and reveal nothing of A, and the randomness of session ids.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb
from seamline.testing.servers import write_tokens

from ..faults.live import (
    HIDDEN,
    EdgeSim,
    ServerThread,
    SyncStream,
    cloud_config,
    generate_call,
    open_message,
    reference_greedy,
    step_message,
)

PROMPT = [17, 4, 99, 250, 31, 8]
NEW = 12
K = 2


@pytest.fixture(scope="module")
def server(sec_checkpoint, tmp_path_factory):
    tokens = write_tokens(tmp_path_factory.mktemp("tokens") / "tokens.txt",
                          {"tok-a-9f3c": "phone-a", "tok-b-51d2": "phone-b"})
    running = ServerThread(cloud_config(sec_checkpoint, auth_tokens=str(tokens), max_sessions=256)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield seamline_pb2_grpc.SeamlineStub(channel)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def test_every_rpc_needs_a_known_token(server, stub, sec_model):
    _, mhash = sec_model
    step = step_message(0, codec.encode(np.ones((1, HIDDEN), np.float32), codec.CodecConfig()))
    refused = [None, (("authorization", "Bearer tok-a-9f3d"),), (("authorization", "Basic tok-a-9f3c"),),
               (("authorization", "Bearer "),), (("authorization", "tok-a-9f3c"),),
               (("authorization", "Bearer tok-a-9f3c tok-b-51d2"),), (("x-authorization", "Bearer tok-a-9f3c"),)]
    for md in refused:
        calls = {
            "Info": lambda md=md: stub.Info(pb.InfoRequest(), metadata=md, timeout=30),
            "Generate open": lambda md=md: list(stub.Generate(iter([open_message(mhash, K), step]), metadata=md,
                                                              timeout=30)),
            "Generate step first": lambda md=md: list(stub.Generate(iter([step]), metadata=md, timeout=30)),
        }
        for name, call in calls.items():
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, md, details)
            assert "tok-" not in details  # the refusal does not echo the token
    replies = generate_call(stub, [open_message(mhash, K), step], token="tok-a-9f3c")
    assert replies[-1].step.position == 1
    assert server.call(lambda: len(server.running.store.sessions)) == 0  # nothing left open


def test_another_device_cannot_use_touch_or_see_a_session(server, stub, sec_model):
    """No message names a session: device B's streams, whatever they send (a rewind included), run in B's
    own sessions; A's session and tokens stay untouched and B's replies reveal nothing of A."""
    model, mhash = sec_model
    a, b = "tok-a-9f3c", "tok-b-51d2"
    expected = reference_greedy(model, PROMPT, NEW)
    edge = EdgeSim(model, K)
    cfg = codec.CodecConfig()
    stream = SyncStream(stub, open_message(mhash, K), a)
    assert next(stream.replies).WhichOneof("kind") == "opened"
    reply = stream.ask(step_message(0, codec.encode(edge.run(PROMPT), cfg))).step
    tokens = [reply.token_id]
    position_before = server.call(lambda: [x.position for x in server.running.store.sessions.values()])
    garbage = codec.encode(np.full((1, HIDDEN), 3.0, np.float32), cfg)
    for start in (reply.position, 2):  # B's own, new session holds no positions
        code, details = code_of(lambda start=start: generate_call(stub, [open_message(mhash, K),
                                                                         step_message(start, garbage)], token=b))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "phone-a" not in details and a not in details
    # a "rewind" to 0 is the start of B's own session
    replies = generate_call(stub, [open_message(mhash, K), step_message(0, garbage)], token=b)
    assert "phone-a" not in str(replies) and a not in str(replies)
    assert server.call(lambda: [(x.device_id, x.position) for x in server.running.store.sessions.values()]) == [
        ("phone-a", position_before[0])]
    # device A carries on where it was and gets exactly the tokens of the unsplit model
    while len(tokens) < NEW:
        reply = stream.ask(step_message(reply.position, codec.encode(edge.run([tokens[-1]]), cfg))).step
        tokens.append(reply.token_id)
    assert tokens == expected
    stream.end()


def test_session_ids_are_random_128_bit_hex(server, stub, sec_model):
    _, mhash = sec_model
    ids = []
    for _ in range(200):
        ids.append(generate_call(stub, [open_message(mhash, K)], token="tok-a-9f3c")[0].opened.session_id)
    assert len(set(ids)) == len(ids)
    assert all(len(sid) >= 32 and all(c in "0123456789abcdef" for c in sid.lower()) for sid in ids)
    # every position but a few fixed format bits takes many values: ~4 random bits per hex digit
    width = min(len(sid) for sid in ids)
    varying = [p for p in range(width) if len({sid[p] for sid in ids}) >= 10]
    assert len(varying) >= 30, f"only {len(varying)} hex positions vary: ids look sequential or structured"
    # no counter or clock in them: consecutive ids share no prefix and have no constant difference
    values = [int(sid, 16) for sid in ids]
    assert len({b - a for a, b in itertools.pairwise(values)}) == len(values) - 1
    assert max(len(_common_prefix(a, b)) for a, b in itertools.pairwise(ids)) < 8
    # and no request carries one: a session is reachable only through its own stream
    for message in (pb.StepRequest, pb.CloseRequest, pb.GenerateRequest):
        assert "session_id" not in message.DESCRIPTOR.fields_by_name


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
