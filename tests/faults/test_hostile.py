"""Hostile input against a live cloud process (issue 10, part 2).

One ``seamline cloud`` subprocess serves the whole module. While hypothesis throws generated
Generate streams (open, step messages) and raw bytes at it, background threads keep a healthy session
generating greedily, a hostile neighbour decoding finite but extreme hidden states (3e38, 1e-38)
at the same split — so that it shares decode batches with the healthy session — and a sampler
reading the server's RSS from /proc. Every answer must carry the status code the proto documents
(seamline.proto, "Error model"); the server must stay up and SERVING, its memory bounded, and the
healthy session's tokens equal to those it got from the idle server (and to the unsplit model's).

The expected code of a generated message comes from an oracle that mirrors the documented rules:
message size first (gRPC), then the stream (INVALID_ARGUMENT when its first message is not an open,
or for a second open), the position (FAILED_PRECONDITION above the session's, INVALID_ARGUMENT below 0), the input (INVALID_ARGUMENT, with the codec's own
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
from hypothesis import HealthCheck, example, given, settings
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
    GENERATE_METHOD,
    HIDDEN,
    MAX_POSITIONS,
    SERVING,
    CloudProcess,
    greedy_session,
    health_status,
    open_message,
    reference_greedy,
    step_message,
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
    raw_generate: grpc.StreamStreamMultiCallable
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
                messages = [open_message(self.mhash, 2, cfg)]
                messages += [step_message(p, rows[p % len(rows)]) for p in range(MAX_POSITIONS)]
                call = self.stub.Generate(iter(messages), timeout=60)
                for reply in call:
                    if self._stop.is_set():
                        call.cancel()
                        break
                    if reply.WhichOneof("kind") == "step":
                        assert reply.step.position == self.neighbour_steps % MAX_POSITIONS + 1
                        assert reply.step.has_token
                        self.neighbour_steps += 1
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED or not self._stop.is_set():
                    self.errors.append(f"neighbour: {e.code().name}: {e.details()}")
                    return
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
                   channel.stream_stream(GENERATE_METHOD, request_serializer=ident, response_deserializer=ident),
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


def _codes(call) -> tuple[str, str, list]:
    replies: list = []
    try:
        replies.extend(call)  # up to the error: extend keeps what arrived before it
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", replies
    return "OK", "", replies


def _generate(live: Live, messages: list[pb.GenerateRequest]) -> tuple[str, str, list[pb.StepReply]]:
    """One Generate stream carrying ``messages``: (status, details, the step replies before it ended)."""
    code, details, replies = _codes(live.stub.Generate(iter(messages), timeout=30))
    return code, details, [r.step for r in replies if r.WhichOneof("kind") == "step"]


def _raw_codes(live: Live, messages: list[bytes]) -> tuple[str, str, list[bytes]]:
    return _codes(live.raw_generate(iter(messages), timeout=30))


def _prefill_message(cfg: codec.CodecConfig, tokens: int, split: int = 2) -> pb.GenerateRequest:
    if split == 0:
        return step_message(0, ids=[3] * tokens, sample=False)
    x = np.random.default_rng(tokens).standard_normal((tokens, HIDDEN)).astype(np.float32)
    return step_message(0, codec.encode(x, cfg), sample=False)


def _step_code(live: Live, cfg: codec.CodecConfig, start: int, tensor: pb.Tensor, prefill: int = 0) -> tuple[str, str]:
    """The status of one step at ``start`` on a new stream at split 2 (after ``prefill`` positions)."""
    messages = [open_message(live.mhash, 2, cfg)]
    if prefill:
        messages.append(_prefill_message(cfg, prefill))
    code, details, replies = _generate(live, [*messages, step_message(start, tensor)])
    assert len(replies) >= len(messages) - 1, (code, details)  # the prefill went through
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
        code, details, replies = _codes(live.stub.Generate(iter([pb.GenerateRequest(open=req)]), timeout=30))
        codes[code] += 1
        assert code == want, details
        if code != "OK":
            assert details
            return
        assert replies[0].WhichOneof("kind") == "opened" and len(replies[0].opened.session_id) >= 32

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
        state = SessionState(split, cfg)
        messages = [open_message(live.mhash, split, cfg)]
        if prefill:
            messages.append(_prefill_message(cfg, prefill, split))
            state.position = prefill
        if kind == "no open":
            messages, want = [pb.GenerateRequest(step=req)], expected_step(req, None)
        elif kind == "second open":
            messages.append(open_message(live.mhash, split, cfg))
            want = "INVALID_ARGUMENT"
        else:
            messages.append(pb.GenerateRequest(step=req))
            want = expected_step(req, state)
        code, details, replies = _generate(live, messages)
        codes[code] += 1
        assert code == want, f"{code} ({details}); expected {want}"
        if code == "OK":
            tokens = len(req.tokens.ids) if split == 0 else req.hidden.shape[0]
            assert replies[-1].position == req.start_position + tokens
            assert replies[-1].has_token == req.sample
        else:
            assert details  # every refusal says what was wrong
        if code == "FAILED_PRECONDITION":
            assert f"resend from position {state.position}" in details

    check()
    _assert_up(live)
    if attack == max(MUTATIONS):  # the last one to run
        print(f"generated steps: {dict(codes)}")
    if sum(codes.values()) >= 100:  # once most attacks ran (the whole module, not `-k` one of them)
        assert len(codes) >= 3, codes  # the generators reach most of the error model (NOT_FOUND needs an eviction)


def test_raw_bytes_on_the_generate_stream(live, watch):
    """After a valid open, bytes that do not parse as a GenerateRequest are refused with the stream; those
    that parse get the status of the message they parse to."""
    cfg = codec.CodecConfig("int8")
    opening = open_message(live.mhash, 2, cfg).SerializeToString()
    x = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    first = step_message(0, codec.encode(x, cfg), sample=False).SerializeToString()  # position 1 after it
    valid = step_message(1, codec.encode(x, cfg)).SerializeToString()  # flipped bits move its position too
    refused_unparsable = set()
    codes: Counter[str] = Counter()

    others = (step_message(0, codec.encode(x, cfg)).SerializeToString(),  # a rewind
              step_message(2, codec.encode(x, cfg)).SerializeToString(),  # beyond the session's position
              step_message(1, pb.Tensor(shape=[1, HIDDEN], codec=pb.INT8)).SerializeToString(),  # malformed
              opening, pb.GenerateRequest(close=pb.CloseRequest()).SerializeToString(), b"")

    @settings(FUZZ, max_examples=100)
    @given(messages=raw_streams(valid, others))
    @example(messages=[valid])  # OK: the three statuses asserted below are reached on every run,
    @example(messages=[others[1]])  # FAILED_PRECONDITION (beyond the session's position),
    @example(messages=[others[2]])  # INVALID_ARGUMENT (a malformed tensor); the draws add the rest
    def check(messages: list[bytes]) -> None:
        code, details, replies = _raw_codes(live, [opening, first, *messages])
        codes[code] += 1
        state = SessionState(2, cfg, position=1)  # a new stream, a new session: follows its position
        wants, closed = [], False
        for m in messages:
            try:
                req = pb.GenerateRequest.FromString(m)
            except DecodeError:
                wants.append(None)
                break
            kind = req.WhichOneof("kind")
            if kind == "close":
                closed = True
                break
            want = expected_step(req.step, state) if kind == "step" else "INVALID_ARGUMENT"
            wants.append(want)
            if want != "OK":
                break
            state.position = req.step.start_position + req.step.hidden.shape[0]
        assert len(replies) == 2 + sum(w == "OK" for w in wants) + closed  # opened, first, steps, closed
        last = wants[-1] if wants and not closed else "OK"
        if last is None:  # unparsable: refused, the stream ends (see test_unparsable_bytes_status)
            assert code != "OK"
            refused_unparsable.add(code)
        else:
            assert code == last, f"{code} ({details}); expected {last}"

    check()
    print(f"raw streams: {dict(codes)}")
    assert refused_unparsable <= {"INVALID_ARGUMENT", "UNKNOWN"}, refused_unparsable
    assert len(codes) >= 3, codes
    _assert_up(live)


# -------------------------------------------------------------------------------- named attacks


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.parametrize("declared_size", ["exact", "bomb", "2**63"])
def test_zstd_bombs(live, watch, name, declared_size):
    cfg = codec.CodecConfig("fp32", zstd=True)
    declared = {"exact": None, "bomb": 1 << 30, "2**63": 2**63}[declared_size]
    code, details = _step_code(live, cfg, 0, _tensor_with(cfg, MAX_CHUNK, bomb(name), declared))
    assert code == "INVALID_ARGUMENT", details
    assert "zstd" in details


def test_two_zstd_frames_and_a_truncated_frame(live, watch):
    cfg = codec.CodecConfig("fp32", zstd=True)
    half = zstandard.ZstdCompressor().compress(bytes(2 * HIDDEN))
    for payload in (half + half, half[:-3], b"\x28\xb5\x2f\xfd", b""):
        code, details = _step_code(live, cfg, 0, _tensor_with(cfg, 1, payload))
        assert code == "INVALID_ARGUMENT", details


HUGE_SHAPES = [[2**62, HIDDEN], [1, 2**62], [2**31 - 1, 2**31 - 1], [MAX_CHUNK, HIDDEN * 2**30], [-1, HIDDEN],
               [1, -HIDDEN], [], [1], [1, 1, HIDDEN], [2**63 - 1] * 8, [0, HIDDEN]]


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=str)
@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_huge_and_lying_declared_shapes(live, watch, shape, name):
    cfg = codec.CodecConfig(name)
    t = codec.encode(np.ones((1, HIDDEN), np.float32), cfg)
    t.ClearField("shape")
    t.shape.extend(shape)
    code, details = _step_code(live, cfg, 0, t)
    assert code == "INVALID_ARGUMENT", details


@pytest.mark.parametrize("cfg", SESSION_CODECS, ids=lambda c: f"{c.codec}{'+zstd' if c.zstd else ''}")
def test_nan_and_inf(live, watch, cfg):
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
        code, details = _step_code(live, cfg, 0, raw)
        assert code == "INVALID_ARGUMENT", details
        assert "NaN or Inf" in details
    with pytest.raises(codec.CodecError):  # and the edge's encoder refuses to send them at all
        codec.encode(x, cfg)


def test_unknown_codecs(live, watch):
    for value in (0, 8, 99, 2**31 - 1, -1):
        req = pb.OpenRequest(model_hash=live.mhash, split=2, codec=pb.CodecSpec(codec=value))
        code, details, _ = _generate(live, [pb.GenerateRequest(open=req)])
        assert code == "INVALID_ARGUMENT", details
    for value in (0, 8, 99, -1):
        t = pb.Tensor(shape=[1, HIDDEN], codec=value, payload=bytes(4 * HIDDEN))
        code, details = _step_code(live, codec.CodecConfig("fp32"), 0, t)
        assert code == "INVALID_ARGUMENT" and "codec" in details, details


def test_position_jumps(live, watch):
    cfg = codec.CodecConfig("int8")
    one = codec.encode(np.ones((1, HIDDEN), np.float32), cfg)
    for start in (5, 6, 1000, 2**62, 2**63 - 1, MAX_POSITIONS):
        code, details = _step_code(live, cfg, start, one, prefill=4)
        assert code == "FAILED_PRECONDITION", details
        assert "resend from position 4" in details
    for start in (-1, -2**63):
        code, details = _step_code(live, cfg, start, one, prefill=4)
        assert code == "INVALID_ARGUMENT", details
    many = codec.encode(np.ones((MAX_POSITIONS - 4, HIDDEN), np.float32), cfg)
    code, details, replies = _generate(live, [open_message(live.mhash, 2, cfg), _prefill_message(cfg, 4),
                                              step_message(4, one), step_message(5, many)])
    assert [r.position for r in replies] == [4, 5]
    assert code == "RESOURCE_EXHAUSTED" and f"max_positions={MAX_POSITIONS}" in details, details


def test_stream_sequence_violations(live, watch):
    """A first message that is not an open, a second open, an empty message, messages after close."""
    cfg = codec.CodecConfig("fp16")
    one = codec.encode(np.ones((1, HIDDEN), np.float32), cfg)
    opening = open_message(live.mhash, 2, cfg)
    for messages in ([step_message(0, one)], [pb.GenerateRequest(close=pb.CloseRequest())], [pb.GenerateRequest()],
                     [opening, step_message(0, one), opening], [opening, pb.GenerateRequest()]):
        code, details, _ = _generate(live, messages)
        assert code == "INVALID_ARGUMENT", details
    # an explicit close ends the stream: OK, and what follows it is never read
    code, details, replies = _codes(live.stub.Generate(iter([opening, _prefill_message(cfg, 2),
                                                             pb.GenerateRequest(close=pb.CloseRequest()),
                                                             step_message(99, one), opening]), timeout=30))
    assert code == "OK", details
    assert [r.WhichOneof("kind") for r in replies] == ["opened", "step", "closed"]
    assert replies[-1].closed.freed_kv_bytes > 0


def test_oversized_messages(live, watch):
    cfg = codec.CodecConfig("fp32")
    big = pb.Tensor(shape=[2 * MAX_CHUNK, HIDDEN], codec=pb.FP32, payload=bytes(8 * MAX_CHUNK * HIDDEN))
    code, details = _step_code(live, cfg, 0, big)
    assert code == "RESOURCE_EXHAUSTED", details
    code, _, _ = _raw_codes(live, [b"\x0a" + bytes(4 * MAX_MESSAGE)])
    assert code == "RESOURCE_EXHAUSTED"
    code, details, _ = _generate(live, [pb.GenerateRequest(open=pb.OpenRequest(model_hash="f" * (2 * MAX_MESSAGE),
                                                                              split=2))])
    assert code == "RESOURCE_EXHAUSTED", details
    # the largest legal chunk still fits under the limit
    code, details, replies = _generate(live, [open_message(live.mhash, 2, cfg), step_message(
        0, codec.encode(np.ones((MAX_POSITIONS - 1, HIDDEN), np.float32), cfg), sample=False)])
    assert code == "OK", details
    assert replies and replies[0].position == MAX_POSITIONS - 1


def test_unparsable_bytes_status(live, watch):
    code, details, _ = _raw_codes(live, [b"\xff\xff\xff\xff"])
    assert code == "INVALID_ARGUMENT", details
    opening = open_message(live.mhash, 2, codec.CodecConfig()).SerializeToString()
    code, details, _ = _raw_codes(live, [opening, b"\xff\xff\xff"])
    assert code == "INVALID_ARGUMENT", details


# ------------------------------------------------------------------- the server after the attack


def _burst(live: Live, rounds: int) -> None:
    """Every kind of refused message, ``rounds`` times (each on a stream of its own)."""
    cfg = codec.CodecConfig("fp32", zstd=True)
    for _ in range(rounds):
        for name in BOMBS:
            assert _step_code(live, cfg, 0, _tensor_with(cfg, MAX_CHUNK, bomb(name)))[0] == "INVALID_ARGUMENT"
        t = pb.Tensor(shape=[2**62, HIDDEN], codec=pb.FP32, payload=bytes(64))
        assert _step_code(live, cfg, 0, t)[0] == "INVALID_ARGUMENT"
        big = pb.Tensor(shape=[MAX_CHUNK, HIDDEN], codec=pb.FP32, payload=bytes(2 * MAX_MESSAGE))
        assert _step_code(live, cfg, 0, big)[0] == "RESOURCE_EXHAUSTED"
        assert _raw_codes(live, [b"\xff\xff\xff\xff"])[0] != "OK"
        assert _step_code(live, cfg, 7, t)[0] == "FAILED_PRECONDITION"
        assert _generate(live, [step_message(0, t)])[0] == "INVALID_ARGUMENT"


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
