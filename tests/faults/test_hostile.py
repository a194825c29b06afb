"""Hostile input against a live cloud process (issue 10, part 2).

One ``seamline cloud`` subprocess serves the whole module. While hypothesis throws generated
``Open`` / ``Step`` messages and raw bytes at it, background threads keep a healthy session
generating greedily, a hostile neighbour decoding finite but extreme hidden states (3e38, 1e-38)
at the same split — so that it shares decode batches with the healthy session — and a sampler
reading the server's RSS from /proc. Every answer must carry the status code the proto documents
(seamline.proto, "Error model"); the server must stay up and SERVING, its memory bounded, and the
healthy session's tokens equal to those it got from the idle server (and to the unsplit model's).

The expected code of a generated message comes from an oracle that mirrors the documented rules:
message size first (gRPC), then the session (NOT_FOUND), the position (FAILED_PRECONDITION above
the session's, INVALID_ARGUMENT below 0), the input (INVALID_ARGUMENT, with the codec's own
``decode`` deciding whether a mutated tensor is still well-formed), the context (RESOURCE_EXHAUSTED).
The targeted tests below assert the codes of the named attacks without that oracle.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import zstandard
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from .hostile import (
    BOMBS,
    MAX_CHUNK,
    MAX_MESSAGE,
    MUTATIONS,
    SESSION_CODECS,
    SessionState,
    bomb,
    expected_open,
    expected_step,
    open_requests,
    raw_streams,
    step_case,
)
from .live import (
    HIDDEN,
    MAX_POSITIONS,
    OPEN_METHOD,
    SERVING,
    STEP_METHOD,
    CloudProcess,
    greedy_session,
    health_status,
    reference_greedy,
)

PROMPT = [5, 6, 7, 8, 9]
HEALTHY_TOKENS = 24
RSS_GROWTH_AFTER_MB = 128  # generous: a decompressed bomb alone would be 1024 MiB
RSS_GROWTH_DURING_MB = 256
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True)

# ------------------------------------------------------------------------------------- fixtures


@dataclass
class Live:
    cloud: CloudProcess
    channel: grpc.Channel
    stub: seamline_pb2_grpc.SeamlineStub
    raw_step: grpc.StreamStreamMultiCallable
    raw_open: grpc.UnaryUnaryMultiCallable
    mhash: str


class Watch:
    """Background threads all module long: a healthy greedy session in a loop; a hostile neighbour at
    the same split decoding finite but extreme hidden states (so that it shares decode batches with
    the healthy session); the server's RSS sampled every 50 ms."""

    def __init__(self, cloud: CloudProcess, model, mhash: str):
        self.cloud, self.model, self.mhash = cloud, model, mhash
        self.channel = grpc.insecure_channel(cloud.address)
        self.stub = seamline_pb2_grpc.SeamlineStub(self.channel)
        self.runs: list[list[int]] = []
        self.errors: list[str] = []
        self.rss_max = 0.0
        self._stop = threading.Event()
        self.neighbour_steps = 0
        self._threads = [threading.Thread(target=self._healthy, daemon=True),
                         threading.Thread(target=self._neighbour, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]

    def generate(self) -> list[int]:
        return greedy_session(self.stub, self.model, self.mhash, PROMPT, HEALTHY_TOKENS)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _healthy(self) -> None:
        while not self._stop.is_set():
            try:
                self.runs.append(self.generate())
            except Exception as e:  # noqa: BLE001 - reported by the final test
                self.errors.append(f"{type(e).__name__}: {e}")
                return
            self._stop.wait(0.05)

    def _neighbour(self) -> None:
        cfg = codec.CodecConfig("fp32")
        rows = [codec.encode(np.full((1, HIDDEN), v, np.float32), cfg) for v in (3e38, -3e38, 1e-38, 0.0)]
        rows.append(codec.encode(np.tile([3e38, -3e38], (1, HIDDEN // 2)).astype(np.float32), cfg))
        while not self._stop.is_set():
            try:
                session = self.stub.Open(pb.OpenRequest(model_hash=self.mhash, split=2, codec=cfg.to_proto()),
                                         timeout=30).session_id
                for position in range(MAX_POSITIONS):
                    if self._stop.is_set():
                        break
                    req = pb.StepRequest(session_id=session, start_position=position, sample=True,
                                         hidden=rows[position % len(rows)])
                    reply = next(iter(self.stub.Step(iter([req]), timeout=30)))
                    assert reply.position == position + 1 and reply.has_token
                    self.neighbour_steps += 1
                self.stub.Close(pb.CloseRequest(session_id=session), timeout=30)
            except Exception as e:  # noqa: BLE001 - reported by the final test
                self.errors.append(f"neighbour: {type(e).__name__}: {e}")
                return

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.rss_max = max(self.rss_max, self.cloud.rss_mb())
            except (OSError, RuntimeError):
                return

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self.channel.close()


@pytest.fixture(scope="module")
def live(fault_checkpoint, fault_model):
    cloud = CloudProcess(fault_checkpoint, "--max-sessions", "512", "--session-ttl", "120").start()
    channel = grpc.insecure_channel(cloud.address)
    try:
        ident = lambda b: b
        yield Live(cloud, channel, seamline_pb2_grpc.SeamlineStub(channel),
                   channel.stream_stream(STEP_METHOD, request_serializer=ident, response_deserializer=ident),
                   channel.unary_unary(OPEN_METHOD, request_serializer=ident, response_deserializer=ident),
                   fault_model[1])
    finally:
        channel.close()
        cloud.stop()


@pytest.fixture(scope="module")
def watch(live, fault_model):
    """Baseline tokens and RSS on the idle (warmed-up) server, then the healthy loop runs all module long."""
    w = Watch(live.cloud, fault_model[0], live.mhash)
    w.baseline = w.generate()
    _burst(live, 1)  # warm up the paths the attack takes (decode thread pool, zstd contexts)
    w.rss_before = live.cloud.rss_mb()
    w.start()
    yield w
    w.stop()


# ----------------------------------------------------------------------------------- calls


def _open(live: Live, cfg: codec.CodecConfig, split: int = 2) -> str:
    req = pb.OpenRequest(model_hash=live.mhash, split=split, codec=cfg.to_proto())
    return live.stub.Open(req, timeout=30).session_id


def _close_quietly(live: Live, session: str) -> None:
    try:
        live.stub.Close(pb.CloseRequest(session_id=session), timeout=30)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()


def _codes(call) -> tuple[str, str, list]:
    replies: list = []
    try:
        replies.extend(call)  # up to the error: extend keeps what arrived before it
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", replies
    return "OK", "", replies


def _steps(live: Live, requests: list[pb.StepRequest]) -> tuple[str, str, list[pb.StepReply]]:
    return _codes(live.stub.Step(iter(requests), timeout=30))


def _raw_codes(live: Live, messages: list[bytes]) -> tuple[str, str, list[bytes]]:
    return _codes(live.raw_step(iter(messages), timeout=30))


def _step_code(live: Live, session: str, start: int, tensor: pb.Tensor) -> tuple[str, str]:
    code, details, _ = _steps(live, [pb.StepRequest(session_id=session, start_position=start, hidden=tensor,
                                                    sample=True)])
    return code, details


def _tensor_with(cfg: codec.CodecConfig, tokens: int, payload: bytes, declared: int | None = None) -> pb.Tensor:
    """A well-formed tensor of ``tokens`` rows under ``cfg``, then a zstd ``payload`` in its place."""
    t = codec.encode(np.ones((tokens, HIDDEN), np.float32), codec.CodecConfig(cfg.codec, group_size=cfg.group_size,
                                                                             rotation_seed=cfg.rotation_seed,
                                                                             outlier_channels=cfg.outlier_channels))
    expected = len(t.payload)
    t.compression, t.payload = pb.ZSTD, payload
    t.uncompressed_size = expected if declared is None else declared
    return t


def _prefill(live: Live, session: str, cfg: codec.CodecConfig, tokens: int) -> None:
    x = np.random.default_rng(tokens).standard_normal((tokens, HIDDEN)).astype(np.float32)
    code, details, _ = _steps(live, [pb.StepRequest(session_id=session, start_position=0,
                                                    hidden=codec.encode(x, cfg), sample=False)])
    assert code == "OK", details


def _assert_up(live: Live) -> None:
    assert live.cloud.alive, f"the cloud process died:\n{live.cloud.output[-3000:]}"
    assert health_status(live.cloud.address) == SERVING


# ------------------------------------------------------------------------------ property tests


def test_generated_open_requests(live, watch):
    codes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=70)
    @given(req=open_requests(live.mhash))
    def check(req: pb.OpenRequest) -> None:
        want = expected_open(req, live.mhash)
        try:
            session = live.stub.Open(req, timeout=30).session_id
        except grpc.RpcError as e:
            codes[e.code().name] += 1
            assert e.code().name == want, e.details()
            assert e.details()
            return
        codes["OK"] += 1
        assert want == "OK"
        assert len(session) >= 32
        _close_quietly(live, session)

    check()
    print(f"generated opens: {dict(codes)}")
    assert len(codes) >= 2, codes
    _assert_up(live)


STEP_CODES: Counter[str] = Counter()


@pytest.mark.parametrize("attack", ["none", *sorted(MUTATIONS)])
def test_generated_step_requests(live, watch, attack):
    """Each attack on ~10 generated requests (plus random extra mutations), for every codec and split."""
    codes = STEP_CODES

    @settings(FUZZ, max_examples=24 if attack == "none" else 9)
    @given(case=step_case(attack))
    def check(case) -> None:
        kind, split, cfg, prefill, req = case
        session = _open(live, cfg, split)
        try:
            state = SessionState(split, cfg)
            if prefill:
                if split == 0:
                    code, details, _ = _steps(live, [pb.StepRequest(session_id=session, start_position=0,
                                                                    tokens=pb.TokenIds(ids=[3] * prefill))])
                    assert code == "OK", details
                else:
                    _prefill(live, session, cfg, prefill)
                state.position = prefill
            req.session_id = session
            if kind == "closed":
                live.stub.Close(pb.CloseRequest(session_id=session), timeout=30)
                state.closed = True
            elif kind == "unknown":
                req.session_id = session[::-1]
            want = expected_step(req, state if kind != "unknown" else None)
            code, details, replies = _steps(live, [req])
            codes[code] += 1
            assert code == want, f"{code} ({details}); expected {want}"
            if code == "OK":
                tokens = len(req.tokens.ids) if split == 0 else req.hidden.shape[0]
                assert replies[0].position == req.start_position + tokens
                assert replies[0].has_token == req.sample
            else:
                assert details  # every refusal says what was wrong
            if code == "FAILED_PRECONDITION":
                assert f"server_position={state.position}" in details
        finally:
            _close_quietly(live, session)

    check()
    _assert_up(live)
    if attack == max(MUTATIONS):  # the last one to run
        print(f"generated steps: {dict(codes)}")
    if sum(codes.values()) >= 100:  # once most attacks ran (the whole module, not `-k` one of them)
        assert len(codes) >= 4, codes  # the generators reach most of the error model


def test_raw_bytes_on_the_step_stream(live, watch):
    """Bytes that do not parse as a StepRequest are refused with the stream; those that parse get the
    status of the request they parse to; the session the valid bytes address keeps working."""
    cfg = codec.CodecConfig("int8")
    session = _open(live, cfg)
    x = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    valid = pb.StepRequest(session_id=session, start_position=0, hidden=codec.encode(x, cfg),
                           sample=True).SerializeToString()
    refused_unparsable = set()
    codes: Counter[str] = Counter()
    state = SessionState(2, cfg)  # follows the session's position as valid messages move it

    @settings(FUZZ, max_examples=100)
    @given(messages=raw_streams(valid))
    def check(messages: list[bytes]) -> None:
        code, details, replies = _raw_codes(live, messages)
        codes[code] += 1
        wants = []
        for m in messages:
            try:
                req = pb.StepRequest.FromString(m)
            except DecodeError:
                wants.append(None)
                break
            want = expected_step(req, state if req.session_id == session else None)
            wants.append(want)
            if want != "OK":
                break
            state.position = req.start_position + req.hidden.shape[0]
        assert len(replies) == sum(w == "OK" for w in wants)
        last = wants[-1]
        if last is None:  # unparsable: refused, the stream ends (see test_unparsable_bytes_status)
            assert code != "OK"
            refused_unparsable.add(code)
        elif last != "OK":
            assert code == last, f"{code} ({details}); expected {last}"
        else:
            assert code == "OK"

    try:
        check()
    finally:
        _close_quietly(live, session)
    print(f"raw streams: {dict(codes)}")
    assert refused_unparsable <= {"INVALID_ARGUMENT", "UNKNOWN"}, refused_unparsable
    assert len(codes) >= 3, codes
    _assert_up(live)


# -------------------------------------------------------------------------------- named attacks


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.parametrize("declared_size", ["exact", "bomb", "2**63"])
def test_zstd_bombs(live, watch, name, declared_size):
    cfg = codec.CodecConfig("fp32", zstd=True)
    session = _open(live, cfg)
    try:
        declared = {"exact": None, "bomb": 1 << 30, "2**63": 2**63}[declared_size]
        code, details = _step_code(live, session, 0, _tensor_with(cfg, MAX_CHUNK, bomb(name), declared))
        assert code == "INVALID_ARGUMENT", details
        assert "zstd" in details
    finally:
        _close_quietly(live, session)


def test_two_zstd_frames_and_a_truncated_frame(live, watch):
    cfg = codec.CodecConfig("fp32", zstd=True)
    session = _open(live, cfg)
    try:
        half = zstandard.ZstdCompressor().compress(bytes(2 * HIDDEN))
        for payload in (half + half, half[:-3], b"\x28\xb5\x2f\xfd", b""):
            code, details = _step_code(live, session, 0, _tensor_with(cfg, 1, payload))
            assert code == "INVALID_ARGUMENT", details
    finally:
        _close_quietly(live, session)


HUGE_SHAPES = [[2**62, HIDDEN], [1, 2**62], [2**31 - 1, 2**31 - 1], [MAX_CHUNK, HIDDEN * 2**30], [-1, HIDDEN],
               [1, -HIDDEN], [], [1], [1, 1, HIDDEN], [2**63 - 1] * 8, [0, HIDDEN]]


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=str)
@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_huge_and_lying_declared_shapes(live, watch, shape, name):
    cfg = codec.CodecConfig(name)
    session = _open(live, cfg)
    try:
        t = codec.encode(np.ones((1, HIDDEN), np.float32), cfg)
        t.ClearField("shape")
        t.shape.extend(shape)
        code, details = _step_code(live, session, 0, t)
        assert code == "INVALID_ARGUMENT", details
    finally:
        _close_quietly(live, session)


@pytest.mark.parametrize("cfg", SESSION_CODECS, ids=lambda c: f"{c.codec}{'+zstd' if c.zstd else ''}")
def test_nan_and_inf(live, watch, cfg):
    session = _open(live, cfg)
    try:
        for value in (np.nan, np.inf, -np.inf):
            x = np.ones((3, HIDDEN), np.float32)
            x[1, 5] = value
            raw = codec.encode(np.ones((3, HIDDEN), np.float32), codec.CodecConfig(
                cfg.codec, group_size=cfg.group_size, rotation_seed=cfg.rotation_seed,
                outlier_channels=cfg.outlier_channels))
            if cfg.codec in ("fp32", "fp16"):
                dtype = "<f4" if cfg.codec == "fp32" else "<f2"
                raw.payload = x.astype(dtype).tobytes()
            else:
                dtype = "<f2" if cfg.codec in ("int4", "int4-rot") else "<f4"
                scales = np.frombuffer(raw.scales, dtype=dtype).copy()
                scales[1] = value
                raw.scales = scales.tobytes()
            code, details = _step_code(live, session, 0, raw)
            assert code == "INVALID_ARGUMENT", details
            assert "NaN or Inf" in details
        with pytest.raises(codec.CodecError):  # and the edge's encoder refuses to send them at all
            codec.encode(x, cfg)
    finally:
        _close_quietly(live, session)


def test_unknown_codecs(live, watch):
    for value in (0, 7, 99, 2**31 - 1, -1):
        req = pb.OpenRequest(model_hash=live.mhash, split=2, codec=pb.CodecSpec(codec=value))
        with pytest.raises(grpc.RpcError) as info:
            live.stub.Open(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    session = _open(live, codec.CodecConfig("fp32"))
    try:
        for value in (0, 7, 99, -1):
            t = pb.Tensor(shape=[1, HIDDEN], codec=value, payload=bytes(4 * HIDDEN))
            code, details = _step_code(live, session, 0, t)
            assert code == "INVALID_ARGUMENT" and "codec" in details, details
    finally:
        _close_quietly(live, session)


def test_position_jumps(live, watch):
    cfg = codec.CodecConfig("int8")
    session = _open(live, cfg)
    try:
        _prefill(live, session, cfg, 4)
        one = codec.encode(np.ones((1, HIDDEN), np.float32), cfg)
        for start in (5, 6, 1000, 2**62, 2**63 - 1):
            code, details = _step_code(live, session, start, one)
            assert code == "FAILED_PRECONDITION", details
            assert "server_position=4" in details
        for start in (-1, -2**63):
            code, details = _step_code(live, session, start, one)
            assert code == "INVALID_ARGUMENT", details
        code, details = _step_code(live, session, MAX_POSITIONS, one)  # after the context is used up
        assert code == "FAILED_PRECONDITION", details
        _, _, replies = _steps(live, [pb.StepRequest(session_id=session, start_position=4, hidden=one, sample=True)])
        assert replies[0].position == 5  # the session continues where it was
        many = codec.encode(np.ones((MAX_POSITIONS - 4, HIDDEN), np.float32), cfg)
        code, details = _step_code(live, session, 5, many)
        assert code == "RESOURCE_EXHAUSTED" and f"max_positions={MAX_POSITIONS}" in details, details
    finally:
        _close_quietly(live, session)


def test_steps_after_close(live, watch):
    cfg = codec.CodecConfig("fp16")
    session = _open(live, cfg)
    _prefill(live, session, cfg, 2)
    one = codec.encode(np.ones((1, HIDDEN), np.float32), cfg)
    assert live.stub.Close(pb.CloseRequest(session_id=session), timeout=30).freed_kv_bytes > 0
    for start in (2, 0, 3):
        code, details = _step_code(live, session, start, one)
        assert code == "NOT_FOUND", details
    with pytest.raises(grpc.RpcError) as info:
        live.stub.Close(pb.CloseRequest(session_id=session), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # a stream that closes its own session between two steps
    session = _open(live, cfg)
    first = pb.StepRequest(session_id=session, start_position=0, hidden=one, sample=True)
    second = pb.StepRequest(session_id=session, start_position=1, hidden=one, sample=True)
    gate = threading.Event()

    def requests():
        yield first
        gate.wait(30)
        yield second

    call = live.stub.Step(requests(), timeout=30)
    assert next(call).position == 1
    live.stub.Close(pb.CloseRequest(session_id=session), timeout=30)
    gate.set()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_messages(live, watch):
    cfg = codec.CodecConfig("fp32")
    session = _open(live, cfg)
    try:
        big = pb.Tensor(shape=[2 * MAX_CHUNK, HIDDEN], codec=pb.FP32, payload=bytes(8 * MAX_CHUNK * HIDDEN))
        code, details = _step_code(live, session, 0, big)
        assert code == "RESOURCE_EXHAUSTED", details
        code, _, _ = _raw_codes(live, [b"\x0a" + bytes(4 * MAX_MESSAGE)])
        assert code == "RESOURCE_EXHAUSTED"
        with pytest.raises(grpc.RpcError) as info:
            live.stub.Open(pb.OpenRequest(model_hash="f" * (2 * MAX_MESSAGE), split=2), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the largest legal chunk still fits under the limit
        _, _, replies = _steps(live, [pb.StepRequest(session_id=session, start_position=0, sample=False,
                                                     hidden=codec.encode(np.ones((MAX_POSITIONS - 1, HIDDEN),
                                                                                 np.float32), cfg))])
        assert replies and replies[0].position == MAX_POSITIONS - 1
    finally:
        _close_quietly(live, session)


def test_unparsable_bytes_status(live, watch):
    code, details, _ = _raw_codes(live, [b"\xff\xff\xff\xff"])
    assert code == "INVALID_ARGUMENT", details
    with pytest.raises(grpc.RpcError) as info:
        live.raw_open(b"\xff\xff\xff", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


# ------------------------------------------------------------------- the server after the attack


def _burst(live: Live, rounds: int) -> None:
    """Every kind of refused message, ``rounds`` times (sessions closed afterwards)."""
    cfg = codec.CodecConfig("fp32", zstd=True)
    for _ in range(rounds):
        session = _open(live, cfg)
        try:
            for name in BOMBS:
                assert _step_code(live, session, 0, _tensor_with(cfg, MAX_CHUNK, bomb(name)))[0] == "INVALID_ARGUMENT"
            t = pb.Tensor(shape=[2**62, HIDDEN], codec=pb.FP32, payload=bytes(64))
            assert _step_code(live, session, 0, t)[0] == "INVALID_ARGUMENT"
            big = pb.Tensor(shape=[MAX_CHUNK, HIDDEN], codec=pb.FP32, payload=bytes(2 * MAX_MESSAGE))
            assert _step_code(live, session, 0, big)[0] == "RESOURCE_EXHAUSTED"
            assert _raw_codes(live, [b"\xff\xff\xff\xff"])[0] != "OK"
            assert _step_code(live, session, 7, t)[0] == "FAILED_PRECONDITION"
        finally:
            _close_quietly(live, session)


def test_server_up_memory_bounded_and_healthy_tokens_unchanged(live, watch, fault_model):
    """Runs last in this module: one more burst while the healthy session generates, then the checks."""
    runs_before = len(watch.runs)
    deadline = time.monotonic() + 60
    while (len(watch.runs) < runs_before + 2 and not watch.errors) and time.monotonic() < deadline:
        _burst(live, 2)  # overlap at least one whole healthy generation with the attack
    watch.stop()
    _assert_up(live)
    assert not watch.errors, watch.errors
    assert watch.baseline == reference_greedy(fault_model[0], PROMPT, HEALTHY_TOKENS)
    assert len(watch.runs) >= runs_before + 2, "the healthy session made no progress during the attack"
    assert watch.neighbour_steps > 0, "the extreme-valued neighbour made no progress"
    assert all(run == watch.baseline for run in watch.runs), [r for r in watch.runs if r != watch.baseline][:3]
    info = live.stub.Info(pb.InfoRequest(), timeout=30)
    assert info.load.active_sessions == 0 and info.load.kv_bytes == 0  # nothing leaked
    after = live.cloud.rss_mb()
    print(f"server RSS: before {watch.rss_before:.0f} MiB, max during {watch.rss_max:.0f} MiB, "
          f"after {after:.0f} MiB; {len(watch.runs)} healthy generations")
    assert watch.rss_max - watch.rss_before < RSS_GROWTH_DURING_MB
    assert after - watch.rss_before < RSS_GROWTH_AFTER_MB
    for marker in ("internal error", "scheduler failed", "executor failed"):
        assert marker not in live.cloud.output, live.cloud.output[-3000:]
