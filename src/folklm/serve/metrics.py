"""``GET /metrics``: counters, gauges and histograms in the Prometheus text format.

Exposition format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/):
``# HELP`` / ``# TYPE`` lines, then samples; a histogram has cumulative ``_bucket{le=...}``
samples ending in ``le="+Inf"``, plus ``_sum`` and ``_count``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

from folklm.engine.scheduler import Engine

BUCKETS = {
    "time_to_first_token_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    "inter_token_latency_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    "request_latency_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    "batch_size": (1, 2, 4, 8, 16, 32, 64, 128),
}
HELP = {
    "time_to_first_token_seconds": "Seconds from arrival to the first generated token.",
    "inter_token_latency_seconds": "Mean seconds between tokens of a finished request.",
    "request_latency_seconds": "Seconds from arrival to the last token.",
    "batch_size": "Sequences in each decode step.",
}


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value


class Metrics:
    """Thread-safe store fed by the HTTP handlers and the engine threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.http: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.hist = {name: Histogram(b) for name, b in BUCKETS.items()}

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.hist[name].observe(value)

    def count_http(self, route: str, status: int) -> None:
        with self.lock:
            self.http[(route, status)] += 1

    def render(self, engines: Mapping[str, Engine]) -> str:
        out: list[str] = []
        p = "folk_"
        with self.lock:
            out += [f"# HELP {p}http_requests_total HTTP requests by route and status."]
            out += [f"# TYPE {p}http_requests_total counter"]
            for (route, status), n in sorted(self.http.items()):
                out.append(f'{p}http_requests_total{{route="{route}",status="{status}"}} {n}')
            for name, h in self.hist.items():
                out += [f"# HELP {p}{name} {HELP[name]}", f"# TYPE {p}{name} histogram"]
                cum = 0
                for b, c in zip((*h.buckets, "+Inf"), h.counts, strict=True):
                    cum += c
                    out.append(f'{p}{name}_bucket{{le="{b}"}} {cum}')
                out += [f"{p}{name}_sum {h.sum}", f"{p}{name}_count {cum}"]
        gauges = {
            "queue_depth": ("Requests waiting for a slot.", lambda e: e.queue_depth),
            "running_sequences": ("Sequences in the running batch.", lambda e: e.batch_size),
            "kv_cache_bytes": ("Bytes held by the KV cache.", lambda e: e.cache.nbytes),
        }
        for name, (text, get) in gauges.items():
            out += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} gauge"]
            out += [f'{p}{name}{{model="{m}"}} {get(e)}' for m, e in engines.items()]
        counters = sorted({k for e in engines.values() for k in e.stats})
        for key in counters:
            out += [f"# TYPE {p}{key} counter"]
            out += [f'{p}{key}{{model="{m}"}} {int(e.stats[key])}' for m, e in engines.items()]
        return "\n".join(out) + "\n"
