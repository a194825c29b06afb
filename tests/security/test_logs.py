"""Bearer tokens, hidden states and token ids never reach the cloud's logs, even at DEBUG level.

A device with a distinctive token runs sessions with distinctive token ids (split 0) and hidden
values (split 2), and provokes every logged error path it can reach (wrong tokens, another
device, NaN, bad ids, garbage bytes, oversized messages). Then the captured logs are grepped for
those needles: in this process (a handler on the root logger at DEBUG) and from a ``seamline
cloud --log-level DEBUG`` subprocess with GRPC_VERBOSITY=debug (its stdout and stderr).
"""

from __future__ import annotations

import logging
import uuid

import grpc
import numpy as np
from google.protobuf import text_encoding
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb
from seamline.testing.servers import write_tokens

from ..faults.live import (
    GENERATE_METHOD,
    HIDDEN,
    CloudProcess,
    ServerThread,
    cloud_config,
    generate_call,
    greedy_session,
    metadata,
    open_message,
    step_message,
)

IDS = [211, 223, 227, 229, 233, 239, 241, 251]
VALUE = 4321.125  # exact in float32


def _tokens_file(path, secret: str, other: str):
    return write_tokens(path, {secret: "phone-secret", other: "phone-other"})


def _renderings(value: float, ids: list[int]) -> list[str]:
    """How a value and a list of ids look in the usual reprs: Python, numpy, torch, protobuf text, bytes."""
    packed = pb.TokenIds(ids=ids).SerializeToString()[2:10]  # varints, as they travel
    return [repr(value), f"{value:.6e}", f"{value:.4e}", ", ".join(map(str, ids[:3])), " ".join(map(str, ids[:3])),
            f"ids: {ids[0]}", repr(packed)[2:-1], packed.hex(), text_encoding.CEscape(packed, as_utf8=False)]


def exercise(address: str, model, mhash: str, secret: str, other: str, wrong: str) -> list[str]:
    """Run sessions and error paths against the server at ``address``; returns the needles to grep for."""
    needles = [secret, other, wrong, *_renderings(VALUE, IDS)]
    with grpc.insecure_channel(address) as channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        md = metadata(secret)
        # split 2: a greedy generation (the sampled ids are needles too), then distinctive hidden values
        generated = greedy_session(stub, model, mhash, IDS, 8, token=secret)
        needles += [", ".join(map(str, generated[:4])), " ".join(map(str, generated[:4])),
                    f"token_id: {generated[1]}"]
        cfg = codec.CodecConfig("fp32")
        hidden = codec.encode(np.full((3, HIDDEN), VALUE, np.float32), cfg)
        needles += [hidden.payload[:16].hex(), repr(hidden.payload[:8])[2:-1],
                    text_encoding.CEscape(hidden.payload[:8], as_utf8=False)]
        opening = open_message(mhash, 2, cfg)
        replies = generate_call(stub, [opening, step_message(0, hidden)], token=secret)
        assert replies[-1].step.position == 3
        bad = np.full((1, HIDDEN), VALUE, np.float32)
        bad[0, 7] = np.nan
        refused = [
            (wrong, [opening, step_message(0, hidden)]),
            (other, [step_message(0, hidden)]),  # no open first
            (secret, [opening, step_message(0, hidden), step_message(3, pb.Tensor(
                shape=[1, HIDDEN], codec=pb.FP32, payload=bad.tobytes()))]),
            (secret, [opening, step_message(99, hidden)]),
        ]
        for token, messages in refused:
            try:
                generate_call(stub, messages, token=token)
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.OK
        # split 0: token ids in the clear, then ids outside the vocabulary
        try:
            generate_call(stub, [open_message(mhash, 0), step_message(0, ids=IDS),
                                 step_message(8, ids=[*IDS, 300])], token=secret)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a wrong token on every RPC, garbage bytes that carry the token, an oversized message
        for call in (lambda: stub.Info(pb.InfoRequest(), metadata=metadata(wrong)),
                     lambda: generate_call(stub, [open_message(mhash, 2)], token=wrong)):
            try:
                call()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = channel.stream_stream(GENERATE_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for message in (b"\xff\xff" + secret.encode(), b"\x0a" + bytes(1 << 20) + secret.encode()):
            try:
                list(raw(iter([message]), metadata=md, timeout=30))
            except grpc.RpcError:
                pass
    return needles


def _assert_clean(text: str, needles: list[str]) -> None:
    found = [n for n in needles if n and n in text]
    assert not found, f"found {found} in the logs:\n" + "\n".join(
        line for line in text.splitlines() if any(n in line for n in found))[:3000]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # message, arguments and traceback


def test_in_process_logs_at_debug(sec_checkpoint, sec_model, tmp_path):
    model, mhash = sec_model
    secret, other, wrong = (f"tok-{kind}-{uuid.uuid4().hex}" for kind in ("SECRET", "OTHER", "WRONG"))
    root, collect = logging.getLogger(), _Collect()
    level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        server = ServerThread(cloud_config(sec_checkpoint, auth_tokens=str(_tokens_file(tmp_path / "t.txt", secret,
                                                                                         other)))).start()
        try:
            needles = exercise(server.address, model, mhash, secret, other, wrong)
        finally:
            server.stop()
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    assert any(line.startswith("DEBUG") for line in collect.lines), "captured no DEBUG record"
    _assert_clean("\n".join(collect.lines), needles)


def test_cloud_process_logs_at_debug(sec_checkpoint, sec_model, tmp_path):
    model, mhash = sec_model
    secret, other, wrong = (f"tok-{kind}-{uuid.uuid4().hex}" for kind in ("SECRET", "OTHER", "WRONG"))
    cloud = CloudProcess(sec_checkpoint, "--auth-tokens", str(_tokens_file(tmp_path / "t.txt", secret, other)),
                         log_level="DEBUG", env={"GRPC_VERBOSITY": "debug"}).start()
    try:
        needles = exercise(cloud.address, model, mhash, secret, other, wrong)
    finally:
        cloud.stop()
    assert " DEBUG " in cloud.output and "listening on" in cloud.output, cloud.output[-2000:]
    _assert_clean(cloud.output, needles)
