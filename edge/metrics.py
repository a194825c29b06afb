"""``EdgeMetrics``: the agent's counters, rendered by hand in the Prometheus text format (0.0.4).

Written out here rather than with ``prometheus_client``, which a device that installed only
``seamline[edge]`` does not have; a handful of counters, a gauge and one histogram need no library.
"""

from __future__ import annotations

from collections import defaultdict

from .messages import GenerationStats

RTT_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    body = ",".join(f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for n, v in zip(names, values, strict=True))
    return "{" + body + "}"


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[tuple(labels)] += amount

    def render(self, kind: str = "counter") -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {kind}"]
        values = self.values or ({(): 0.0} if not self.label_names else {})
        out += [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(values.items())]
        return out


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts, strict=True)]
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.total:g}",
                f"{self.name}_count {self.count}"]
        return out


class EdgeMetrics:
    def __init__(self):
        self.requests = Counter("seamline_edge_requests_total", "HTTP generation requests by route and status",
                                ("route", "status"))
        self.tokens = Counter("seamline_edge_tokens_total", "generated tokens by the path that served them",
                              ("path",))
        self.prompt_tokens = Counter("seamline_edge_prompt_tokens_total", "prompt tokens processed")
        self.replays = Counter("seamline_edge_replays_total", "history replays after the cloud lost a session")
        self.fallbacks = Counter("seamline_edge_fallbacks_total", "generations finished locally (offline)")
        self.bytes = Counter("seamline_edge_cloud_bytes_total", "bytes on the Step streams", ("direction",))
        self.ms = Counter("seamline_edge_time_ms_total", "milliseconds spent, by where", ("where",))
        self.in_flight = Counter("seamline_edge_requests_in_flight", "generations running now")
        self.step_rtt = Histogram("seamline_edge_inter_token_ms",
                                  "mean time between the tokens of one generation (ms)", RTT_BUCKETS_MS)

    def observe_generation(self, stats: GenerationStats) -> None:
        for path, n in stats.served_by.items():
            self.tokens.inc(n, path)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.replays.inc(stats.replays)
        if stats.served_by.get("local"):
            self.fallbacks.inc()
        self.bytes.inc(stats.bytes_sent, "sent")
        self.bytes.inc(stats.bytes_received, "received")
        for where, ms in (("edge", stats.edge_ms), ("network", stats.network_ms), ("cloud_queue", stats.cloud_queue_ms),
                          ("cloud_compute", stats.cloud_compute_ms), ("local", stats.local_ms)):
            self.ms.inc(ms, where)
        tokens = stats.completion_tokens
        if tokens > 1 and stats.total_ms > stats.ttft_ms:
            per_token = (stats.total_ms - stats.ttft_ms) / (tokens - 1)
            self.step_rtt.observe(per_token)

    def render(self) -> str:
        lines: list[str] = []
        for c in (self.requests, self.tokens, self.prompt_tokens, self.replays, self.fallbacks, self.bytes, self.ms):
            lines += c.render()
        lines += self.in_flight.render("gauge")
        lines += self.step_rtt.render()
        return "\n".join(lines) + "\n"
