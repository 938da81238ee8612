"""Prometheus metrics. Job counts, queue depth, worker count and stage latencies live in the shared
state (workers record them; any API replica reports the same numbers); request counts are per
API process."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from headforge.service.jobs import STATUSES, JobStore
from headforge.service.settings import QUEUES
from headforge.service.state import StateBackend

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def record_stage_timings(backend: StateBackend, timings_ms: dict[str, Any]) -> None:
    """Add one observation per stage to the shared stage-latency histograms."""
    for stage, value in timings_ms.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        seconds = float(value) / 1000.0
        amounts = {"count": 1.0, "sum": seconds}
        for bound in STAGE_BUCKETS:
            if seconds <= bound:
                amounts[f"le:{bound}"] = 1.0
        backend.incr(f"stage:{stage}", amounts)
        backend.index_add("stage_names", stage, 0.0)


class SharedStateCollector(Collector):
    """Reads job, queue, worker and stage numbers from the job store at scrape time."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    def collect(self) -> Iterator[Any]:
        by_status = GaugeMetricFamily("headforge_jobs", "Jobs currently stored, by status", labels=["status"])
        for status in STATUSES:
            by_status.add_metric([status], self.jobs.count_status(status))
        yield by_status

        finished = CounterMetricFamily(
            "headforge_jobs_finished", "Jobs that reached a final status", labels=["status"]
        )
        totals = self.jobs.backend.counters("jobs_finished")
        for status in ("succeeded", "failed", "canceled"):
            finished.add_metric([status], totals.get(status, 0.0))
        yield finished

        depth = GaugeMetricFamily("headforge_queue_depth", "Jobs waiting in each queue", labels=["queue"])
        for queue in QUEUES:
            depth.add_metric([queue], self.jobs.queue_depth(queue))
        yield depth

        yield GaugeMetricFamily(
            "headforge_workers", "Workers seen in the last minute", value=self.jobs.live_workers()
        )

        # A separate family rather than a label on headforge_workers: a worker that consumes both
        # queues counts under each, so these do not sum to the worker count.
        per_queue = GaugeMetricFamily(
            "headforge_queue_workers",
            "Workers seen in the last minute that consume each queue",
            labels=["queue"],
        )
        for queue in QUEUES:
            per_queue.add_metric([queue], self.jobs.live_workers(queue=queue))
        yield per_queue

        stages = HistogramMetricFamily("headforge_stage_seconds", "Pipeline stage latency", labels=["stage"])
        for stage in sorted(self._stage_names()):
            counts = self.jobs.backend.counters(f"stage:{stage}")
            buckets = [(str(b), counts.get(f"le:{b}", 0.0)) for b in STAGE_BUCKETS]
            buckets.append(("+Inf", counts.get("count", 0.0)))
            stages.add_metric([stage], buckets, sum_value=counts.get("sum", 0.0))
        yield stages

    def _stage_names(self) -> list[str]:
        return self.jobs.backend.members("stage_names", limit=200)


def make_registry(jobs: JobStore) -> tuple[CollectorRegistry, Counter, Histogram]:
    """A registry with the shared-state collector and this process's HTTP metrics."""
    registry = CollectorRegistry()
    registry.register(SharedStateCollector(jobs))
    requests = Counter(
        "headforge_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "headforge_http_request_seconds",
        "HTTP request latency",
        ["route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, math.inf),
    )
    return registry, requests, latency
