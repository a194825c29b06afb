"""``EdgeAgent``: the daemon — the bundle in ONNX Runtime, the cloud link, the local HTTP API.

Start-up loads the bundle (every file's sha256 is checked; a bad bundle is a ``BundleError`` that
says how to fix it), opens the ORT sessions on one worker thread's behalf, and serves the API with
uvicorn on ``listen``. SIGTERM / SIGINT drain: ``/healthz`` turns 503 and new generation requests
get 503, the listening socket closes, in-flight requests (streams included) finish within
``grace`` seconds, then the cloud channels and the worker close and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path

import uvicorn
from seamline.protos import memory

from .api import AgentState, create_app
from .config import ConfigError, EdgeConfig, split_listen
from .engine import GenerationEngine
from .link import CloudLink
from .metrics import EdgeMetrics
from .policy import FixedPolicy, SplitPolicy
from .runtime import EdgeRuntime
from .worker import ComputeWorker

EDGE_ARENAS = 1  # glibc malloc arenas of the agent process (see build_engine)

log = logging.getLogger("seamline.edge")


def build_engine(config: EdgeConfig, policy: SplitPolicy | None = None) -> GenerationEngine:
    """Load the bundle and wire runtime, worker, link and policy together (no HTTP)."""
    # One malloc arena (MALLOC_ARENA_MAX overrides): with an arena per thread a SmolLM2 int4 generation
    # peaked ~20 MB higher (README, "Edge runtime settings"); a device has no memory to spare.
    memory.cap_arenas(default=EDGE_ARENAS)
    if not config.bundle:
        raise ConfigError("no bundle: pass --bundle DIR (a folder written by `seamline partition`) or set "
                          "`bundle` in the config file")
    bundle = Path(config.bundle).expanduser()
    runtime = EdgeRuntime(bundle, threads=config.threads, int8=config.int8, verify=config.verify,
                          precision=config.precision, compose=config.compose)
    m = runtime.manifest
    if not config.cloud and not m.has_all_layers:
        raise ConfigError(f"no cloud endpoint, and {bundle} exports only {m.edge_layers} of {m.num_layers} layers "
                          "(no LM head), so it cannot generate alone: pass --cloud HOST:PORT, or partition with "
                          "every layer (no --max-edge-layers)")
    if config.max_token_recovery is not None:  # the privacy floor from the measured curve (seamline privacy)
        from .planner import Constraints, PlanError

        try:
            m.min_split = Constraints.from_manifest(m, max_token_recovery=config.max_token_recovery).min_split
        except PlanError as e:
            raise ConfigError(f"{bundle}: {e}") from None
        m.default_split = max(m.default_split, m.min_split)
    if policy is None and config.adaptive:
        from .controller import AdaptivePolicy
        from .planner import LinkEstimate, parse_bandwidth, parse_duration_ms

        prior = None
        if config.bandwidth or config.rtt:
            prior = LinkEstimate(parse_bandwidth(config.bandwidth or "20mbit"), parse_duration_ms(config.rtt or "30ms"))
        policy = AdaptivePolicy.from_manifest(runtime.manifest, link=prior)
    if policy is None:
        policy = FixedPolicy.from_manifest(runtime.manifest, config.split, config.codec, config.zstd)
    link = CloudLink(config) if config.cloud else None
    return GenerationEngine(runtime, ComputeWorker(), link, policy, config)


async def close_engine(engine: GenerationEngine) -> None:
    if engine.link is not None:
        await engine.link.close()
    await asyncio.to_thread(engine.worker.shutdown)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the agent drains first, then exits with 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return None


class EdgeAgent:
    def __init__(self, config: EdgeConfig, policy: SplitPolicy | None = None):
        self.config = config
        self.engine = build_engine(config, policy)
        m = self.engine.manifest
        self.metrics = EdgeMetrics(lambda: self.engine.policy.status())
        self.state = AgentState(self.engine, self.metrics, config.model_name or m.model_id, self._health)
        self.app = create_app(self.state)
        self.server: _Server | None = None
        self.url: str | None = None
        self._tasks: list[asyncio.Task] = []

    def _health(self) -> dict:
        m, choice = self.engine.manifest, self.engine.policy.status().choice
        link = self.engine.link
        return {
            "bundle": str(self.engine.runtime.bundle_dir), "layers": m.num_layers, "edge_layers": m.edge_layers,
            "split": choice.k if choice else None, "codec": choice.codec_name if choice else None,
            "int8": self.engine.runtime.int8, "precision": self.engine.runtime.precision,
            "offline_fallback": m.has_all_layers,
            "cloud": [{"endpoint": ep, "status": link.status.get(ep, "unknown")}
                      for ep in (link.endpoints if link else [])],
            "last_cloud_error": link.last_error if link else None,
        }

    async def _probe_cloud(self) -> None:
        """At start-up: ask every endpoint for Info and log what it serves (never fatal)."""
        link = self.engine.link
        for ep in link.endpoints:
            try:
                t0 = asyncio.get_running_loop().time()
                info = await link.info(ep)
                self.engine.policy.observe_info(info, (asyncio.get_running_loop().time() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001 - a probe; generations retry on their own
                link.status[ep] = f"unreachable at start-up: {getattr(e, 'message', e)}"
                log.warning("cloud %s is not reachable yet: %s", ep, getattr(e, "message", e))
                continue
            if info.model_hash != self.engine.manifest.source_model_hash:
                link.status[ep] = "serves another model"
                log.error("cloud %s serves %s (%s...), not the bundle's model (%s...): re-partition or point "
                          "--cloud elsewhere", ep, info.model_id, info.model_hash[:12],
                          self.engine.manifest.source_model_hash[:12])
            else:
                link.status[ep] = "ok"
                log.info("cloud %s: %s on %s, splits [%d, %d]", ep, info.model_id, info.device, info.min_split,
                         info.max_split)

    async def start(self) -> str:
        """Bind ``listen``, start serving; returns the base URL (``http://HOST:PORT``)."""
        if self.config.adaptive and self.config.calibrate_s > 0:
            halves = await self.engine.calibrate(self.config.calibrate_s)  # before any request: this device's speed
            if halves:
                log.info("every layer on this device: %s ms per token (--calibrate-s %g)",
                         " / ".join(f"{ms:.1f}" for _, ms in halves), self.config.calibrate_s)
        host, port = split_listen(self.config.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {self.config.listen} ({e.strerror}); is the port taken? choose "
                              "another --listen HOST:PORT (port 0 picks a free one)") from None
        sock.listen(128)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        uv = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(1, int(self.config.grace)))
        self.server = _Server(uv)
        serving = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]), name="seamline-http")
        self._tasks.append(serving)
        while not self.server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.005)
        if self.engine.link is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._probe_cloud(), name="seamline-probe"))
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        return self.url

    async def stop(self) -> None:
        """Drain: refuse new work, let in-flight requests finish (up to ``grace``), then close."""
        self.state.draining = True
        if self.server is not None:
            self.server.should_exit = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await close_engine(self.engine)

    async def run_until_signal(self) -> int:
        url = await self.start()
        memory.settle_heap()
        m, choice = self.engine.manifest, self.engine.policy.status().choice
        where = ", ".join(self.engine.link.endpoints) if self.engine.link else "none (local only)"
        split = (f"split {choice.k} of {m.num_layers}, codec {choice.codec_name}" if choice
                 else f"adaptive split of {m.num_layers} layers")
        print(f"seamline edge listening on {url} (model {self.state.model_name}, {split}, "
              f"cloud {where}, offline fallback {'yes' if m.has_all_layers else 'no'})", flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = loop.create_task(stop.wait(), name="seamline-signal")
        await asyncio.wait([self._tasks[0], waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        print(f"seamline edge: draining ({self.state.in_flight} requests in flight)", flush=True)
        await self.stop()
        print("seamline edge: stopped", flush=True)
        return 0
