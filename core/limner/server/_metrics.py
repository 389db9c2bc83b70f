"""Prometheus metrics: HTTP traffic counted by middleware, the pool read at scrape time.

Each app has its own ``CollectorRegistry``, so two apps in one process (tests, say) never
share or clash over series.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from limner import KeyStats

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _PoolCollector(Collector):
    """Reads ``pool.stats()`` on every scrape: always current, nothing to keep in sync."""

    def __init__(
        self, stats: Callable[[], dict[str, KeyStats] | None], ready: Callable[[], bool]
    ) -> None:
        self.stats = stats
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        snapshot = self.stats() or {}
        yield GaugeMetricFamily(
            "limner_ready", "1 once every preloaded model is loaded", value=float(self.ready())
        )
        yield GaugeMetricFamily(
            "limner_models_loaded",
            "Models with weights loaded in the pool",
            value=sum(s.state == "ready" for s in snapshot.values()),
        )
        gauges = {
            "loaded": ("limner_model_loaded", "1 while the model's weights are loaded"),
            "queue_depth": ("limner_queue_depth", "Requests waiting in the model's queue"),
            "in_flight": ("limner_in_flight", "Batches and generations running on the model"),
            "workers": ("limner_workers", "Worker tasks serving the model"),
            "memory_bytes": ("limner_model_memory_bytes", "Memory accounted to the model"),
            "waiting": ("limner_waiting_callers", "Callers waiting for the model (queued or cold)"),
            "oldest_wait": (
                "limner_oldest_wait_seconds",
                "How long the model's oldest waiting caller has waited",
            ),
            "draining": ("limner_model_draining", "1 while the model's turn is draining"),
        }
        counters = {
            "batches": ("limner_batches", "Embedding batches run"),
            "loads": ("limner_model_loads", "Times the model's weights were loaded"),
            "load_seconds": ("limner_model_load_seconds", "Seconds spent loading the model"),
            "evictions": ("limner_evictions", "Times the model was unloaded"),
            "swaps": ("limner_swaps", "Times the model was unloaded to make room for another"),
            "wait_timeouts": (
                "limner_wait_timeouts",
                "Callers of the model that gave up after max_wait",
            ),
        }
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            name: GaugeMetricFamily(metric, text, labels=["model"])
            for name, (metric, text) in gauges.items()
        }
        families.update(
            {
                name: CounterMetricFamily(metric, text, labels=["model"])
                for name, (metric, text) in counters.items()
            }
        )
        for key, stats in sorted(snapshot.items()):
            values = {
                "loaded": float(stats.state == "ready"),
                "queue_depth": stats.queue_depth,
                "in_flight": stats.in_flight,
                "workers": stats.workers,
                "memory_bytes": stats.memory_mb * 1024 * 1024,
                "batches": stats.batches,
                "loads": stats.loads,
                "load_seconds": stats.load_seconds,
                "evictions": stats.evictions,
                "waiting": stats.waiting,
                "oldest_wait": stats.oldest_wait_seconds,
                "draining": float(stats.draining),
                "swaps": stats.swaps,
                "wait_timeouts": stats.wait_timeouts,
            }
            for name, value in values.items():
                families[name].add_metric([key], float(value))
        yield from families.values()


class _Registry(CollectorRegistry):
    """A registry whose exposition leaves out prometheus_client's ``*_created`` series: a
    counter's creation time, which no dashboard reads and every scrape would carry.

    Per registry, so nothing else in the process changes (``disable_created_metrics`` would
    change every registry of the host's).
    """

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            kept = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            if len(kept) != len(metric.samples):
                metric = copy.copy(metric)
                metric.samples = kept
            yield metric


class Metrics:
    """The app's metrics registry and the HTTP series the middleware feeds."""

    def __init__(
        self, *, stats: Callable[[], dict[str, KeyStats] | None], ready: Callable[[], bool]
    ) -> None:
        self.registry = _Registry(auto_describe=True)
        self.requests = Counter(
            "limner_http_requests",
            "HTTP requests answered, by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "limner_http_request_duration_seconds",
            "Time from request to the end of the answer (a whole stream included)",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "limner_http_requests_in_progress",
            "HTTP requests being served",
            registry=self.registry,
        )
        self.connections_open = Gauge(
            "limner_http_connections_open",
            "Open client connections (at most max_connections)",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "limner_http_connections_closed",
            "Connections the server closed on a client: header_timeout, body_timeout, "
            "headers_too_large, over_capacity",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(stats, ready))
