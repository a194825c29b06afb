"""Who may do what: bearer tokens on every RPC, sessions bound to their device, unguessable ids.

tests/cloud/test_auth.py already checks Info/Open without a token, a wrong token on Open, and
device B's Step and Close on device A's session. This file adds what it leaves out: Step and
Close without or with a wrong token, that device B's attempts (a rewind included) leave device A's
session and tokens untouched and reveal nothing of A, and the randomness of session ids.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from ..faults.live import HIDDEN, EdgeSim, ServerThread, cloud_config, metadata, reference_greedy

PROMPT = [17, 4, 99, 250, 31, 8]
NEW = 12
K = 2


@pytest.fixture(scope="module")
def server(sec_checkpoint, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text("tok-a-9f3c phone-a\ntok-b-51d2 phone-b\n")
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


def one_step(stub, req: pb.StepRequest, token: str | None) -> pb.StepReply:
    return next(iter(stub.Step(iter([req]), metadata=metadata(token), timeout=30)))


def test_every_rpc_needs_a_known_token(server, stub, sec_model):
    _, mhash = sec_model
    session = stub.Open(pb.OpenRequest(model_hash=mhash, split=K), metadata=metadata("tok-a-9f3c")).session_id
    step = pb.StepRequest(session_id=session, start_position=0, sample=True,
                          hidden=codec.encode(np.ones((1, HIDDEN), np.float32), codec.CodecConfig()))
    refused = [None, (("authorization", "Bearer tok-a-9f3d"),), (("authorization", "Basic tok-a-9f3c"),),
               (("authorization", "Bearer "),), (("authorization", "tok-a-9f3c"),),
               (("authorization", "Bearer tok-a-9f3c tok-b-51d2"),), (("x-authorization", "Bearer tok-a-9f3c"),)]
    for md in refused:
        calls = {
            "Info": lambda md=md: stub.Info(pb.InfoRequest(), metadata=md, timeout=30),
            "Open": lambda md=md: stub.Open(pb.OpenRequest(model_hash=mhash, split=K), metadata=md, timeout=30),
            "Step": lambda md=md: list(stub.Step(iter([step]), metadata=md, timeout=30)),
            "Close": lambda md=md: stub.Close(pb.CloseRequest(session_id=session), metadata=md, timeout=30),
        }
        for name, call in calls.items():
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, md, details)
            assert "tok-" not in details  # the refusal does not echo the token
    # none of the refused calls touched the session: it is still open at position 0
    assert one_step(stub, step, "tok-a-9f3c").position == 1
    assert stub.Close(pb.CloseRequest(session_id=session), metadata=metadata("tok-a-9f3c")).freed_kv_bytes > 0


def test_another_device_cannot_use_touch_or_see_a_session(server, stub, sec_model):
    model, mhash = sec_model
    a, b = "tok-a-9f3c", "tok-b-51d2"
    expected = reference_greedy(model, PROMPT, NEW)
    session = stub.Open(pb.OpenRequest(model_hash=mhash, split=K), metadata=metadata(a)).session_id
    edge = EdgeSim(model, K)
    cfg = codec.CodecConfig()
    reply = one_step(stub, pb.StepRequest(session_id=session, start_position=0, sample=True,
                                          hidden=codec.encode(edge.run(PROMPT), cfg)), a)
    tokens = [reply.token_id]
    kv_before = server.call(lambda: server.running.store.sessions[session].position)
    garbage = codec.encode(np.full((1, HIDDEN), 3.0, np.float32), cfg)
    attempts = [pb.StepRequest(session_id=session, start_position=reply.position, hidden=garbage, sample=True),
                pb.StepRequest(session_id=session, start_position=0, hidden=garbage, sample=True),  # rewind
                pb.StepRequest(session_id=session, start_position=2, hidden=garbage, sample=False)]
    for req in attempts:
        code, details = code_of(lambda req=req: list(stub.Step(iter([req]), metadata=metadata(b), timeout=30)))
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "phone-a" not in details and a not in details
    code, details = code_of(lambda: stub.Close(pb.CloseRequest(session_id=session), metadata=metadata(b)))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert server.call(lambda: server.running.store.sessions[session].position) == kv_before
    # device A carries on where it was and gets exactly the tokens of the unsplit model
    while len(tokens) < NEW:
        reply = one_step(stub, pb.StepRequest(session_id=session, start_position=reply.position, sample=True,
                                              hidden=codec.encode(edge.run([tokens[-1]]), cfg)), a)
        tokens.append(reply.token_id)
    assert tokens == expected
    assert stub.Close(pb.CloseRequest(session_id=session), metadata=metadata(a)).freed_kv_bytes > 0


def test_session_ids_are_random_128_bit_hex(server, stub, sec_model):
    _, mhash = sec_model
    md = metadata("tok-a-9f3c")
    ids = []
    for _ in range(200):
        sid = stub.Open(pb.OpenRequest(model_hash=mhash, split=K), metadata=md, timeout=30).session_id
        ids.append(sid)
        stub.Close(pb.CloseRequest(session_id=sid), metadata=md, timeout=30)
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
    # the neighbours of a live id are not sessions
    live = stub.Open(pb.OpenRequest(model_hash=mhash, split=K), metadata=md, timeout=30).session_id
    try:
        for guess in (f"{int(live, 16) + 1:0{len(live)}x}", f"{int(live, 16) - 1:0{len(live)}x}", live.upper(),
                      live[:-1], live + "0"):
            code, _ = code_of(lambda guess=guess: stub.Close(pb.CloseRequest(session_id=guess), metadata=md))
            assert code == grpc.StatusCode.NOT_FOUND, guess
    finally:
        stub.Close(pb.CloseRequest(session_id=live), metadata=md, timeout=30)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
