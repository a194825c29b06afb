#!/usr/bin/env python
"""Coverage-guided fuzzing of what a hostile client can send on the cloud's Generate stream (issues 10, 16).

Each input is one byte string; its first byte picks the mode:

- 0 ``step``: the rest parsed as a ``StepRequest`` and run through the cloud's own conversion
  (``cloud/wire.step_input``, which calls ``protos/codec.decode``) for a session of the codec the
  second byte picks; one such input in 8 also goes to a LIVE in-process server, as the step after
  an open on a new Generate stream (protocol v2: the stream is the session), whose status must
  match the local verdict;
- 1 ``tensor``: the rest parsed as a codec ``Tensor`` and decoded under one session codec;
- 2 ``structured``: a tensor built field by field from the bytes (shape, codec, compression,
  declared sizes, scales, payload — mostly consistent lengths, so decoding reaches the
  dequantizers and zstd), decoded locally and, one in 8, sent to the live server;
- 3 ``raw``: the rest sent as-is after a valid open on a live Generate stream (the generic stub of
  the tests); what it parses to (a step, a second open, a close, nothing) decides the status.

What counts as a finding (an uncaught exception, saved by the fuzzer as a crash input): any
exception other than ``CodecError`` / ``CloudError(INVALID_ARGUMENT)``; a decoded array that is not
float32 ``[tokens, hidden]``, finite and C-contiguous; an fp32/fp16 round trip that is not exact;
a live status other than the one the local verdict predicts; the live server not SERVING. The
fuzzer's ``-rss_limit_mb`` (1536 unless given) bounds memory: a decompressed bomb trips it.

Usage (atheris; ``pip install 'seamline[fuzz]'``)::

    python fuzz/fuzz_step.py [--time SECONDS] [--runs N] [--stats FILE] [CORPUS_DIR] [libFuzzer flags]

Without atheris (or with ``--engine hypothesis``) the same target runs under a hypothesis loop
with the same bounds. A seed corpus of valid messages is written to ``out/fuzz/corpus`` when no
corpus directory is given (or the one given is empty); crash inputs go to ``out/fuzz/`` (``-artifact_prefix``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "fuzz"

try:
    import atheris
except ImportError:  # the hypothesis engine below needs no native fuzzer
    atheris = None


def _instrumented_imports():
    """Import the code under test with atheris' coverage instrumentation (when atheris is there)."""
    if atheris is None:
        import contextlib

        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["seamline.protos", "seamline.cloud"])


with _instrumented_imports():
    import numpy as np
    from seamline.cloud import wire
    from seamline.cloud.errors import CloudError
    from seamline.cloud.sampling import SamplingParams
    from seamline.cloud.sessions import Session
    from seamline.protos import codec
    from seamline.protos import seamline_pb2 as pb

import grpc
import zstandard
from google.protobuf.message import DecodeError
from seamline.protos import seamline_pb2_grpc


def _load_live():
    """tests/faults/live.py: the tiny checkpoint and the in-process server the tests use."""
    spec = importlib.util.spec_from_file_location("seamline_fuzz_live", REPO / "tests" / "faults" / "live.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


live = _load_live()
HIDDEN, VOCAB, MAX_POSITIONS = live.HIDDEN, live.VOCAB, live.MAX_POSITIONS
MAX_CHUNK = 256
MAX_MESSAGE = MAX_CHUNK * HIDDEN * 4 + (1 << 16)
LIMITS = codec.DecodeLimits(HIDDEN, MAX_CHUNK)
LIVE_EVERY = 8  # one input in 8 of the step and structured modes also goes to the live server
CODECS = [
    codec.CodecConfig("fp32"),
    codec.CodecConfig("fp32", zstd=True),
    codec.CodecConfig("fp16"),
    codec.CodecConfig("int8"),
    codec.CodecConfig("int8", zstd=True),
    codec.CodecConfig("int4", group_size=32),
    codec.CodecConfig("int4", group_size=64, zstd=True),
    codec.CodecConfig("int4-rot", group_size=64, rotation_seed=12345),
    codec.CodecConfig("int8-outlier", outlier_channels=(3, 17, 40)),
]
ENUMS = [0, 1, 2, 3, 4, 5, 6, 7, 99, -1]
SPECIAL_DIMS = [0, 1, 2, 3, HIDDEN, MAX_CHUNK, MAX_CHUNK + 1, 2**31 - 1, 2**32, 2**62, -1, -HIDDEN, 2**63 - 1]


class Finding(AssertionError):
    """A property of the cloud's input handling that does not hold."""


# ------------------------------------------------------------------------------- byte provider


class Provider:
    """Consumes a byte string the way atheris.FuzzedDataProvider does (works without atheris)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int_in(self, low: int, high: int) -> int:
        span = high - low
        value, shift = 0, 0
        while span >> shift and self.pos < len(self.data):
            value |= self.byte() << shift
            shift += 8
        return low + (value % (span + 1))

    def pick(self, options):
        return options[self.int_in(0, len(options) - 1)]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + max(0, n)]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


# -------------------------------------------------------------------------------------- checks


def _session(cfg: codec.CodecConfig, split: int = 2) -> Session:
    return Session("fuzz", "anonymous", split, cfg, SamplingParams(), 0, 0.0)


def check_decoded(x: np.ndarray, t: pb.Tensor, cfg: codec.CodecConfig) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise Finding(f"decode returned {type(x).__name__} {getattr(x, 'dtype', None)}")
    if list(x.shape) != list(t.shape) or not 1 <= x.shape[0] <= MAX_CHUNK or x.shape[1] != HIDDEN:
        raise Finding(f"decode returned shape {x.shape} for a declared {list(t.shape)}")
    if not np.isfinite(x).all():
        raise Finding("decode returned NaN or Inf")
    if cfg.codec in ("fp32", "fp16"):  # exact codecs: re-encoding gives the same values back
        again = codec.decode(codec.encode(x, codec.CodecConfig(cfg.codec)), codec.CodecConfig(cfg.codec), LIMITS)
        if not np.array_equal(again, x):
            raise Finding(f"{cfg.codec} round trip is not exact")


def local_decode(t: pb.Tensor, cfg: codec.CodecConfig) -> str:
    try:
        x = codec.decode(t, cfg, LIMITS)
    except codec.CodecError:
        return "INVALID_ARGUMENT"
    check_decoded(x, t, cfg)
    return "OK"


def local_step(req: pb.StepRequest, session: Session) -> tuple[str, int]:
    """The cloud's verdict on ``req`` without a server: (status, tokens)."""
    try:
        inp = wire.step_input(req, session, MODEL_INFO)
    except CloudError as e:
        if e.status != "INVALID_ARGUMENT":
            raise Finding(f"step_input raised {e.status}: {e.message}") from None
        return "INVALID_ARGUMENT", 0
    if inp.hidden is not None:
        check_decoded(inp.hidden, req.hidden, session.codec)
    return "OK", inp.tokens


# -------------------------------------------------------------------------------- live server


class LiveServer:
    def __init__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="seamline-fuzz-")
        ckpt = live.tiny_gpt2(Path(self.dir.name) / "gpt2")
        self.server = live.ServerThread(live.cloud_config(ckpt, session_ttl=3600.0, max_sessions=64,
                                                          kv_budget=256 * 2**20)).start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = seamline_pb2_grpc.SeamlineStub(self.channel)
        ident = lambda b: b
        self.raw = self.channel.stream_stream(live.GENERATE_METHOD, request_serializer=ident,
                                              response_deserializer=ident)
        info = self.stub.Info(pb.InfoRequest(), timeout=30)
        self.mhash = info.model_hash
        self.model_info = self.server.running.model

    def code(self, messages, serialized: bool = False) -> tuple[str, list]:
        call = (self.raw if serialized else self.stub.Generate)(iter(messages), timeout=30)
        replies: list = []
        try:
            replies.extend(call)
        except grpc.RpcError as e:
            return e.code().name, replies
        return "OK", replies

    def step(self, req: pb.StepRequest, index: int) -> str:
        """Send ``req`` after an open (codec ``index``) on a new stream; the status must be the local verdict's."""
        cfg = CODECS[index % len(CODECS)]
        local, tokens = local_step(req, _session(cfg))
        if req.ByteSize() > MAX_MESSAGE - 64:
            return "skipped"  # near the gRPC limit the framing decides; test_hostile covers oversize
        if req.start_position > 0:  # a new session holds no positions
            want = "FAILED_PRECONDITION"
        elif req.start_position < 0 or local != "OK":
            want = "INVALID_ARGUMENT"
        elif req.start_position + tokens > MAX_POSITIONS:
            want = "RESOURCE_EXHAUSTED"
        else:
            want = "OK"
        got, replies = self.code([live.open_message(self.mhash, 2, cfg), pb.GenerateRequest(step=req)])
        if got != want:
            raise Finding(f"live server answered {got}, expected {want} (a new session)")
        if got == "OK":
            position = replies[-1].step.position
            if position != req.start_position + tokens:
                raise Finding(f"live position {position} != {req.start_position} + {tokens}")
        return got

    def raw_bytes(self, data: bytes) -> str:
        try:
            parsed = pb.GenerateRequest.FromString(data)
        except DecodeError:
            parsed = None
        opening = live.open_message(self.mhash, 2, CODECS[0]).SerializeToString()
        got, _ = self.code([opening, data], serialized=True)
        if parsed is None:
            if got not in ("UNKNOWN", "INVALID_ARGUMENT"):  # UNKNOWN: the documented gap of issue 10
                raise Finding(f"unparsable bytes answered {got}")
        elif len(data) > MAX_MESSAGE - 64:
            return "skipped"
        elif parsed.WhichOneof("kind") in ("open", None) and got != "INVALID_ARGUMENT":
            raise Finding(f"a second open or an empty message after the open answered {got}")
        elif parsed.WhichOneof("kind") == "close" and got != "OK":
            raise Finding(f"a close after the open answered {got}")
        return got

    def check_serving(self) -> None:
        if live.health_status(self.server.address) != live.SERVING:
            raise Finding("the live server is not SERVING")


# ------------------------------------------------------------------------------------- target


STATS: Counter[str] = Counter()
STARTED = time.monotonic()
STATS_FILE: Path | None = None
SERVER: LiveServer | None = None
MODEL_INFO = None


def structured_tensor(p: Provider) -> tuple[pb.Tensor, codec.CodecConfig]:
    cfg = p.pick(CODECS)
    flags = p.byte()
    tokens = p.int_in(1, 6) if flags & 1 else p.pick(SPECIAL_DIMS)
    shape = [tokens, HIDDEN] if flags & 2 else [p.pick(SPECIAL_DIMS) for _ in range(p.int_in(0, 3))]
    t = pb.Tensor(shape=shape, codec=codec.codec_enum(cfg.codec) if flags & 4 else p.pick(ENUMS),
                  group_size=cfg.group_size if flags & 8 else p.pick([0, 16, 32, 64, 48, -1]))
    try:
        payload_len, scales_len = codec._layout(cfg, max(0, min(tokens, MAX_CHUNK)), HIDDEN)
    except Exception:  # noqa: BLE001 - a layout the codec cannot have: lengths from the data then
        payload_len, scales_len = p.int_in(0, 512), p.int_in(0, 32)
    if not flags & 16:
        payload_len, scales_len = p.int_in(0, 2048), p.int_in(0, 64)
    scales = p.take(scales_len)
    t.scales = (scales * (scales_len // max(1, len(scales)) + 1))[:scales_len] if scales else bytes(scales_len)
    body = p.rest()
    payload = (body * (payload_len // max(1, len(body)) + 1))[:payload_len] if body else bytes(payload_len)
    if flags & 32:  # a real zstd frame, declared or not, with a declared size that may lie
        comp = zstandard.ZstdCompressor(level=1, write_content_size=bool(flags & 64))
        t.payload, t.compression = comp.compress(payload), pb.ZSTD
        t.uncompressed_size = len(payload) if flags & 128 else (len(payload) * 3 + 1)
    else:
        t.payload = payload
    return t, cfg


def one_input(data: bytes) -> None:
    if not data:
        return
    n = sum(STATS[k] for k in ("step", "tensor", "structured", "raw"))
    mode, p = data[0] % 4, Provider(data[1:])
    if mode == 0:
        cfg = p.pick(CODECS)
        body = p.rest()
        try:
            req = pb.StepRequest.FromString(body)
        except DecodeError:
            STATS["step"] += 1
            STATS["step:unparsable"] += 1
            return
        STATS["step"] += 1
        STATS[f"step:{local_step(req, _session(cfg))[0]}"] += 1
        if SERVER is not None and zlib.crc32(data) % LIVE_EVERY == 0:
            STATS[f"live:{SERVER.step(req, CODECS.index(cfg))}"] += 1
    elif mode == 1:
        cfg = p.pick(CODECS)
        try:
            t = pb.Tensor.FromString(p.rest())
        except DecodeError:
            STATS["tensor"] += 1
            STATS["tensor:unparsable"] += 1
            return
        STATS["tensor"] += 1
        STATS[f"tensor:{local_decode(t, cfg)}"] += 1
    elif mode == 2:
        t, cfg = structured_tensor(p)
        STATS["structured"] += 1
        STATS[f"structured:{local_decode(t, cfg)}"] += 1
        if SERVER is not None and zlib.crc32(data) % LIVE_EVERY == 0:
            req = pb.StepRequest(start_position=0, hidden=t, sample=bool(data[0] & 128))
            STATS[f"live:{SERVER.step(req, CODECS.index(cfg))}"] += 1
    else:
        STATS["raw"] += 1
        if SERVER is not None:
            STATS[f"live-raw:{SERVER.raw_bytes(p.rest())}"] += 1
    if n and n % 2000 == 0 and SERVER is not None:
        SERVER.check_serving()
    if n and n % 20000 == 0:
        report()


def report(final: bool = False) -> dict:
    cases = sum(STATS[k] for k in ("step", "tensor", "structured", "raw"))
    summary = {"cases": cases, "seconds": round(time.monotonic() - STARTED, 1), "final": final,
               "outcomes": dict(sorted(STATS.items()))}
    print(f"fuzz_step: {json.dumps(summary)}", flush=True)
    if STATS_FILE is not None:
        STATS_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATS_FILE.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -------------------------------------------------------------------------------------- seeds


def seeds() -> list[bytes]:
    """Valid messages of every mode and codec, so the fuzzer starts from inside the format."""
    out = []
    rng = np.random.default_rng(0)
    for i, cfg in enumerate(CODECS):
        for tokens in (1, 3):
            t = codec.encode(rng.standard_normal((tokens, HIDDEN)).astype(np.float32), cfg)
            req = pb.StepRequest(start_position=0, hidden=t, sample=True)
            out.append(bytes([0 * 4 + 0, i]) + req.SerializeToString())   # step mode, live
            out.append(bytes([4 * 1 + 1, i]) + t.SerializeToString())     # tensor mode
            out.append(bytes([3, i]) + pb.GenerateRequest(step=req).SerializeToString())  # raw mode
        out.append(bytes([2, i, 0xFF]) + bytes(range(64)))                # structured, consistent lengths
    return out


def write_seed_corpus(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds()):
        (path / f"seed-{i:03d}").write_bytes(data)


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global SERVER, MODEL_INFO, STATS_FILE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=float, default=60.0, help="stop after this many seconds (default 60)")
    parser.add_argument("--runs", type=int, default=0, help="stop after this many cases (default: no limit)")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default="atheris" if atheris else "hypothesis")
    parser.add_argument("--no-live", action="store_true", help="local decode path only, no live server")
    parser.add_argument("--stats", type=Path, default=OUT / "stats.json", help="summary JSON (rewritten as it runs)")
    args, rest = parser.parse_known_args(argv)
    STATS_FILE = args.stats
    if not args.no_live:
        SERVER = LiveServer()
        MODEL_INFO = SERVER.model_info
    else:
        from seamline.cloud.messages import ModelInfo
        from seamline.partitioner.families.base import ModelShape

        MODEL_INFO = ModelInfo("fuzz", "0" * 64, ModelShape("gpt2", 4, HIDDEN, 4, 4, HIDDEN // 4, VOCAB,
                                                            MAX_POSITIONS, True),
                               0, 4, codec.CODEC_NAMES, (0.0,) * 4, 0.0, "cpu", MAX_CHUNK)
    try:
        if args.engine == "atheris":
            if atheris is None:
                parser.error("atheris is not installed: pip install 'seamline[fuzz]', or use --engine hypothesis")
            return run_atheris(args, rest)
        return run_hypothesis(args)
    finally:
        if SERVER is not None:
            SERVER.server.stop()


def run_atheris(args, rest: list[str]) -> int:
    flags = [a for a in rest if a.startswith("-")]
    corpus = [a for a in rest if not a.startswith("-")]
    corpus = corpus or [str(OUT / "corpus")]
    if not Path(corpus[0]).is_dir() or not any(Path(corpus[0]).iterdir()):
        write_seed_corpus(Path(corpus[0]))  # new findings are added to the first directory
    OUT.mkdir(parents=True, exist_ok=True)
    defaults = {"-max_total_time": str(int(args.time)), "-rss_limit_mb": "1536", "-max_len": "4096",
                "-artifact_prefix": f"{OUT}/", "-print_final_stats": "1"}
    if args.runs:
        defaults["-runs"] = str(args.runs)
    given = {f.split("=", 1)[0] for f in flags}
    flags += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    print(f"fuzz_step: atheris {' '.join(flags)} {' '.join(corpus)}", flush=True)

    import atexit

    atexit.register(report, True)
    atheris.Setup([sys.argv[0], *flags, *corpus], one_input)
    atheris.Fuzz()  # libFuzzer exits the process at the end
    return 0


def run_hypothesis(args) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    deadline = time.monotonic() + args.time
    runs = args.runs or 10**9
    pool = seeds()

    @st.composite
    def inputs(draw) -> bytes:
        if draw(st.booleans()):
            data = bytearray(draw(st.sampled_from(pool)))
            for _ in range(draw(st.integers(0, 4))):  # byte edits of a valid seed
                if data:
                    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            cut = draw(st.integers(0, len(data)))
            return bytes(data[:cut]) + draw(st.binary(max_size=16)) + bytes(data[cut:]) \
                if draw(st.booleans()) else bytes(data)
        return draw(st.binary(min_size=1, max_size=512))

    def cases() -> int:
        return sum(STATS[k] for k in ("step", "tensor", "structured", "raw"))

    def chunk_of(size: int, stop_at: int):
        @settings(max_examples=size, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(data=inputs())
        def target(data: bytes) -> None:
            if time.monotonic() < deadline and cases() < min(runs, stop_at):
                one_input(data)
        return target

    chunk = 1000
    while time.monotonic() < deadline and cases() < runs:
        before = cases()
        chunk_of(chunk, before + chunk)()
        if cases() == before:  # nothing ran: the bounds are reached
            break
    report(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
