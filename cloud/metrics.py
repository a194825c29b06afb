"""Prometheus metrics of the cloud service, on a registry of its own (so tests can run many servers).

Served by ``prometheus_client.start_http_server`` on ``--metrics-port`` (``/metrics``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class CloudMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("seamline_cloud_active_sessions", "Open sessions", registry=r)
        self.kv_bytes = Gauge("seamline_cloud_kv_bytes", "KV cache bytes held by all sessions", registry=r)
        self.queue_depth = Gauge("seamline_cloud_queue_depth", "Steps waiting for the scheduler", registry=r)
        self.steps = Counter("seamline_cloud_steps", "Steps executed", ["kind"], registry=r)
        self.batches = Counter("seamline_cloud_batches", "Forward passes", ["kind"], registry=r)
        self.batch_size = Histogram("seamline_cloud_batch_size", "Sessions per forward pass", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_seconds = Histogram("seamline_cloud_queue_seconds", "Time a step waited for its batch",
                                       buckets=_MS_BUCKETS, registry=r)
        self.compute_seconds = Histogram("seamline_cloud_compute_seconds", "Forward pass time (back half, "
                                         "head, sampling)", ["kind"], buckets=_MS_BUCKETS, registry=r)
        self.bytes_in = Counter("seamline_cloud_bytes_in", "Request bytes received", ["rpc"], registry=r)
        self.bytes_out = Counter("seamline_cloud_bytes_out", "Reply bytes sent", ["rpc"], registry=r)
        self.errors = Counter("seamline_cloud_errors", "RPCs answered with an error", ["code"], registry=r)
        self.evictions = Counter("seamline_cloud_evictions", "Sessions evicted after the TTL", registry=r)
        # children bound once: ``labels()`` per message was ~2.5 % of the service's CPU per step
        self.step_bytes_in, self.step_bytes_out = self.bytes_in.labels("Step"), self.bytes_out.labels("Step")
        self._by_kind: dict[str, tuple] = {}  # kind -> its children, bound at first use
        self._http = None

    def bind(self, sessions: Callable[[], float], kv_bytes: Callable[[], float],
             queue_depth: Callable[[], float]) -> None:
        """Gauges read live values when scraped."""
        self.active_sessions.set_function(sessions)
        self.kv_bytes.set_function(kv_bytes)
        self.queue_depth.set_function(queue_depth)

    def observe_batch(self, kind: str, size: int, compute_ms: float) -> None:
        children = self._by_kind.get(kind)
        if children is None:
            children = self._by_kind[kind] = (self.steps.labels(kind), self.batches.labels(kind),
                                              self.batch_size.labels(kind), self.compute_seconds.labels(kind))
        steps, batches, batch_size, compute = children
        steps.inc(size)
        batches.inc()
        batch_size.observe(size)
        compute.observe(compute_ms / 1e3)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP server (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
