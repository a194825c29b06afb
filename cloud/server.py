"""``serve(config)``: load the model, measure it, and run the gRPC server until ``stop()``.

Besides ``seamline.v1.Seamline`` the server answers the standard health service (SERVING, then
NOT_SERVING while draining) and reflection. ``stop()`` drains: new streams and new steps answer
UNAVAILABLE, steps already submitted finish within the grace period, then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from seamline.partitioner.loading import load_model, model_hash
from seamline.protos import codec, memory
from seamline.protos import seamline_pb2 as pb

from . import matmul
from .auth import Authenticator, server_credentials
from .config import CloudConfig, ConfigError
from .encoder import EncoderExecutor, executor_for
from .executor import TorchExecutor
from .kvpool import KVPool
from .messages import ModelInfo
from .metrics import CloudMetrics
from .scheduler import BatchScheduler
from .service import Malformed, SeamlineService
from .sessions import SessionStore

log = logging.getLogger("seamline.cloud")


def tolerant_handlers(service: SeamlineService) -> grpc.GenericRpcHandler:
    """The service's handlers with deserializers that never raise.

    Bytes that do not parse as the request message become a ``Malformed`` value that the service
    answers with INVALID_ARGUMENT; grpc's own deserializer would answer UNKNOWN and log a traceback
    per message, which lets a hostile client flood the log.
    """
    def loads(cls):
        def parse(data: bytes):
            try:
                return cls.FromString(data)
            except DecodeError as e:
                return Malformed(cls.__name__, str(e))
        return parse

    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(service.Info, loads(pb.InfoRequest),
                                                    pb.InfoReply.SerializeToString),
        "Generate": grpc.stream_stream_rpc_method_handler(service.Generate, loads(pb.GenerateRequest),
                                                          pb.GenerateReply.SerializeToString),
        "Embed": grpc.unary_unary_rpc_method_handler(service.Embed, loads(pb.EmbedRequest),
                                                     pb.EmbedReply.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Seamline"].full_name  # seamline.v1.Seamline


@dataclass(eq=False)
class Trimmer:
    """Frees a dropped session's KV at once, and after a burst of releases (or when the last session went)
    hands the freed memory back to the OS: the KV slab's free pages, then the malloc heap (protos/memory.py)."""

    store: SessionStore
    pool: KVPool | None
    executor: object
    released: int = 0
    burst: int = 16
    interval_s: float = 0.5
    trims: int = 0

    def on_release(self, session_id: str) -> None:
        if self.pool is not None:
            self.pool.release(session_id)
        self.released += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.released >= self.burst or (self.released and not len(self.store)):
                self.released = 0
                if self.pool is not None:
                    await self.executor.run(self.pool.trim)  # on the worker: the slab's one writer
                await asyncio.to_thread(memory.trim)
                self.trims += 1


@dataclass(eq=False)
class RunningServer:
    config: CloudConfig
    server: grpc.aio.Server
    port: int
    model: ModelInfo
    executor: TorchExecutor | EncoderExecutor
    store: SessionStore
    scheduler: BatchScheduler
    service: SeamlineService
    health: health.aio.HealthServicer
    metrics: CloudMetrics
    metrics_port: int | None
    tasks: list[asyncio.Task] = field(default_factory=list)
    trimmer: Trimmer | None = None
    _stopping: bool = False
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (idempotent): refuse new work, finish in-flight steps, then close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace if grace is None else grace
        started = time.monotonic()
        try:
            self.service.draining = True
            await self.health.enter_graceful_shutdown()  # every service NOT_SERVING
            if not await self.scheduler.wait_idle(grace):
                log.warning("grace period of %.1fs over with %d steps in flight", grace, self.scheduler.in_flight)
        finally:
            await self.server.stop(max(0.0, grace - (time.monotonic() - started)))
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.metrics.stop()
            self.executor.worker.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve(config: CloudConfig, make_executor=None) -> RunningServer:
    """Start serving; ``make_executor(model, config)`` replaces the executor (the benchmarks' NullExecutor)."""
    auth = Authenticator.from_config(config)      # configuration errors before the slow part
    credentials = server_credentials(config)
    memory.cap_arenas()  # before the server's threads exist: their arenas would keep freed memory
    model, path = await asyncio.to_thread(load_model, config.model)
    digest = await asyncio.to_thread(model_hash, path)
    executor = await asyncio.to_thread(make_executor or executor_for, model, config)  # Encoder: BERT (Embed)
    shape = executor.shape
    if config.min_split > shape.num_layers:
        raise ConfigError(f"min_split {config.min_split} exceeds the model's {shape.num_layers} layers")
    if config.tune_matmul and shape.causal and executor.device.type == "cpu" and executor.runs_model:
        started = time.monotonic()
        tuning = await executor.run(matmul.tune, executor.adapter, config.min_split, executor.dtype)
        if tuning.no_memory:
            log.warning("matmul layouts %s; --no-tune-matmul skips tuning and this check", tuning.summary())
        else:
            log.info("matmul layouts tuned in %.1f s: %s", time.monotonic() - started, tuning.summary())
    layer_ms, head_ms = await executor.run(executor.measure_layer_ms)
    info = ModelInfo(model_id="demo" if config.model == "demo" else path.name, model_hash=digest, shape=shape,
                     min_split=config.min_split, max_split=shape.num_layers, codecs=codec.CODEC_NAMES,
                     layer_ms=tuple(layer_ms), head_ms=head_ms, device=executor.device_name,
                     max_chunk_tokens=config.max_chunk_tokens, max_draft_rows=config.max_draft_tokens)

    store = SessionStore(config, shape.max_positions)
    metrics = CloudMetrics()
    scheduler = BatchScheduler(config, executor, store, metrics)
    metrics.bind(lambda: len(store), lambda: store.kv_bytes, lambda: scheduler.queue_depth)
    store.on_evict = lambda _session: metrics.evictions.inc()
    trimmer = Trimmer(store, executor.pool if shape.causal else None, executor)
    def on_release(session_id: str) -> None:
        scheduler.forget(session_id)
        trimmer.on_release(session_id)

    store.on_release = on_release
    service = SeamlineService(config, info, store, scheduler, executor, auth, metrics)

    max_message = config.max_chunk_tokens * shape.hidden_size * 4 + (1 << 16)  # an fp32 chunk + headroom
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((tolerant_handlers(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        if credentials is not None:
            port = server.add_secure_port(f"{host}:{config.port}", credentials)
        else:
            port = server.add_insecure_port(f"{host}:{config.port}")
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {host}:{config.port} ({e}); is the port taken? choose another "
                          "--port, or 0 for a free one") from None
    metrics_port = None
    if config.metrics_port is not None:
        try:
            metrics_port = metrics.serve(config.metrics_port, config.metrics_host)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port} ({e}); "
                              "choose another --metrics-port") from None
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(config, server, port, info, executor, store, scheduler, service, health_servicer,
                            metrics, metrics_port, trimmer=trimmer)
    running.tasks += [asyncio.create_task(scheduler.run(), name="seamline-scheduler"),
                      asyncio.create_task(store.run_evictor(), name="seamline-evictor"),
                      asyncio.create_task(trimmer.run(), name="seamline-trim")]
    return running
