"""``EdgeMetrics``: the agent's Prometheus metrics (``prometheus_client``, on a registry of its own).

Counters of requests, tokens, bytes and time per place; a gauge of requests in flight; a histogram of
the time between tokens; and, read from the split policy's ``status()`` at every scrape, its current
split and codec, decision and switch counts and (adaptive policy) its live link and cloud estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .messages import GenerationStats
from .policy import PolicyStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INTER_TOKEN_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class PolicyCollector(Collector):
    """The split policy's state as metrics, read when scraped."""

    def __init__(self, status: Callable[[], PolicyStatus], prefix: str = "seamline_edge_policy"):
        self.status, self.prefix = status, prefix

    def collect(self) -> Iterator[Metric]:
        s, p = self.status(), self.prefix
        split = GaugeMetricFamily(f"{p}_split", "current split k (the layer count = all-local), labelled with "
                                  "the codec (ids, a wire codec or local)", labels=["codec"])
        if s.choice is not None:
            split.add_metric([s.choice.codec_name], s.choice.k)
        yield split
        yield CounterMetricFamily(f"{p}_decisions", "split choices made", value=s.decisions)
        yield CounterMetricFamily(f"{p}_switches", "split/codec changes", value=s.switches)
        e = s.estimates
        if e is None:
            return
        for name, value, help_text in (
                ("bandwidth_bps", e.bandwidth_bps, "estimated uplink bandwidth, bits/s"),
                ("rtt_ms", e.rtt_ms, "estimated round-trip time, ms"),
                ("queue_ms", e.queue_ms, "estimated cloud queue, ms"),
                ("edge_decode_scale", e.edge_decode_scale, "edge decode time, measured / profiled"),
                ("local_decode_scale", e.local_decode_scale, "all-local decode time, measured / profiled"),
                ("cloud_scale", e.cloud_scale, "cloud compute time, measured / profiled")):
            yield GaugeMetricFamily(f"{p}_{name}", help_text, value=value)


class EdgeMetrics:
    def __init__(self, policy_status: Callable[[], PolicyStatus] | None = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("seamline_edge_requests", "HTTP generation requests by route and status",
                                ["route", "status"], registry=r)
        self.tokens = Counter("seamline_edge_tokens", "generated tokens by the path that served them", ["path"],
                              registry=r)
        self.prompt_tokens = Counter("seamline_edge_prompt_tokens", "prompt tokens processed", registry=r)
        self.replays = Counter("seamline_edge_replays", "history replays after the cloud lost a session", registry=r)
        self.fallbacks = Counter("seamline_edge_fallbacks", "generations with tokens made on the edge alone (offline fallback, or moved there)", registry=r)
        self.bytes = Counter("seamline_edge_cloud_bytes", "bytes on the Step streams", ["direction"], registry=r)
        self.ms = Counter("seamline_edge_time_ms", "milliseconds spent, by where", ["where"], registry=r)
        self.in_flight = Gauge("seamline_edge_requests_in_flight", "generations running now", registry=r)
        self.inter_token_ms = Histogram("seamline_edge_inter_token_ms",
                                        "mean time between the tokens of one generation (ms)",
                                        buckets=INTER_TOKEN_BUCKETS_MS, registry=r)
        if policy_status is not None:
            r.register(PolicyCollector(policy_status))

    def count_request(self, route: str, status: int | str) -> None:
        self.requests.labels(route, str(status)).inc()

    def observe_generation(self, stats: GenerationStats) -> None:
        for path, n in stats.served_by.items():
            self.tokens.labels(path).inc(n)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.replays.inc(stats.replays)
        if stats.served_by.get("local"):
            self.fallbacks.inc()
        self.bytes.labels("sent").inc(stats.bytes_sent)
        self.bytes.labels("received").inc(stats.bytes_received)
        for where, ms in (("edge", stats.edge_ms), ("network", stats.network_ms), ("cloud_queue", stats.cloud_queue_ms),
                          ("cloud_compute", stats.cloud_compute_ms), ("local", stats.local_ms)):
            self.ms.labels(where).inc(max(0.0, ms))
        tokens = stats.completion_tokens
        if tokens > 1 and stats.total_ms > stats.ttft_ms:
            self.inter_token_ms.observe((stats.total_ms - stats.ttft_ms) / (tokens - 1))

    def render(self) -> str:
        """The Prometheus text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry).decode()
