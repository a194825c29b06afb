"""Live cloud servers for the fault, hostile-input and security tests (shared with tests/security).

- ``tiny_gpt2(path)``: a 4-layer, 64-wide random GPT-2 (vocab 256, 128 positions) saved like a real
  checkpoint; the server and the test load the same weights.
- ``CloudProcess``: ``python -m seamline cloud`` in a subprocess on loopback port 0, ready when the
  health service answers SERVING; keeps its stdout/stderr and reads its RSS from /proc.
- ``ServerThread``: ``serve(config)`` in this process on an event loop of its own thread (for
  tests that inspect state or capture logs with a logging handler).
- ``EdgeSim`` and ``greedy_session``: the edge's half in torch and one greedy generation through
  the synchronous gRPC API, to check that a healthy session's tokens do not change.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from ..cloudkit import SERVING, EdgeSim, ServerThread, health_status, wait_serving  # noqa: F401 - re-exported

VOCAB = 256
HIDDEN = 64
LAYERS = 4
MAX_POSITIONS = 128
STEP_METHOD = "/seamline.v1.Seamline/Step"
OPEN_METHOD = "/seamline.v1.Seamline/Open"


def tiny_gpt2(path: Path) -> Path:
    """A small random GPT-2 checkpoint (seeded: the same weights every run).

    ``initializer_range=0.1`` (not GPT-2's 0.02) so that greedy decoding wanders over many token ids
    instead of repeating one: a changed hidden state or KV cache shows up as changed tokens.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(10)
    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=4, n_positions=MAX_POSITIONS,
                                       vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                                       initializer_range=0.1))
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------- health


# -------------------------------------------------------------------------------------- servers


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (VmRSS of /proc/PID/status)."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
    return int(m.group(1)) / 1024


class CloudProcess:
    """``seamline cloud`` in a subprocess; ``stop()`` sends SIGTERM and collects the output."""

    def __init__(self, model: Path | str, *flags: str, log_level: str = "INFO", env: dict | None = None):
        self.cmd = [sys.executable, "-m", "seamline", "cloud", "--model", str(model), "--host", "127.0.0.1",
                    "--port", "0", "--device", "cpu", "--log-level", log_level, *flags]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._listening = threading.Event()
        self._readers: list[threading.Thread] = []

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            m = re.search(r"listening on (\S+)", line)
            if m and self.address is None:
                self.address = m.group(1)
                self._listening.set()
        self._listening.set()  # the process ended: stop waiting

    def start(self, credentials: grpc.ChannelCredentials | None = None, timeout: float = 120) -> CloudProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            reader = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        self._listening.wait(timeout)
        if self.address is None:
            self.stop()
            raise RuntimeError(f"cloud did not start: {' '.join(self.cmd)}\n{self.output[-3000:]}")
        wait_serving(self.address, credentials, timeout=timeout)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(5)
        return self.proc.returncode


def cloud_config(model: Path, **overrides):
    from seamline.cloud.config import CloudConfig

    base = CloudConfig(model=str(model), host="127.0.0.1", port=0, device="cpu", max_sessions=64,
                       kv_budget=64 * 2**20, batch_window_ms=2.0, grace=2.0)
    return replace(base, **overrides)


# ------------------------------------------------------------------------------------- the edge


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def greedy_session(stub: seamline_pb2_grpc.SeamlineStub, model, mhash: str, prompt: Sequence[int], new_tokens: int,
                   k: int = 2, cfg: codec.CodecConfig | None = None, token: str | None = None,
                   timeout: float = 60) -> list[int]:
    """Open, prefill ``prompt``, decode ``new_tokens - 1`` more greedily on one stream, close."""
    cfg = cfg or codec.CodecConfig()
    md = metadata(token)
    opened = stub.Open(pb.OpenRequest(model_hash=mhash, split=k, codec=cfg.to_proto()), metadata=md,
                       timeout=timeout)
    edge = EdgeSim(model, k)
    requests: list[pb.StepRequest] = []
    cond = threading.Condition()

    def feed():
        sent = 0
        while True:
            with cond:
                cond.wait_for(lambda n=sent: len(requests) > n)
                req = requests[sent]
            if req is None:
                return
            sent += 1
            yield req

    def push(req):
        with cond:
            requests.append(req)
            cond.notify()

    tokens: list[int] = []
    push(pb.StepRequest(session_id=opened.session_id, start_position=0, sample=True,
                        hidden=codec.encode(edge.run(prompt), cfg)))
    replies = stub.Step(feed(), metadata=md, timeout=timeout)
    try:
        for reply in replies:
            tokens.append(reply.token_id)
            if len(tokens) >= new_tokens or reply.finished:
                push(None)
                continue
            push(pb.StepRequest(session_id=opened.session_id, start_position=reply.position, sample=True,
                                hidden=codec.encode(edge.run([reply.token_id]), cfg), step_id=len(tokens)))
    finally:
        push(None)
    stub.Close(pb.CloseRequest(session_id=opened.session_id), metadata=md, timeout=timeout)
    return tokens


def model_and_hash(path: Path):
    from seamline.partitioner.loading import load_model, model_hash

    return load_model(path)[0], model_hash(path)


@torch.inference_mode()
def reference_greedy(model, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy tokens of the unsplit model, recomputing the whole sequence each step."""
    ids, out = list(prompt), []
    for _ in range(new_tokens):
        out.append(int(torch.argmax(model(torch.tensor([ids])).logits[0, -1])))
        ids.append(out[-1])
    return out


def deadline_loop(seconds: float):
    """Yield until ``seconds`` have passed (for bounded polling loops)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield
