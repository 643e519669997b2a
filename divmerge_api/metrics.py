"""Prometheus metrics: HTTP latencies (per replica) and job gauges read from the database at scrape time."""

from __future__ import annotations

import time
from datetime import timedelta

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from starlette.requests import Request

from divmerge_service.config import Settings
from divmerge_service.db import session_scope
from divmerge_service.models import FINISHED, STATUSES, utcnow

from . import crud

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class JobCollector:
    """Jobs by status, queue depth and job durations (last 24 h), straight from the source of truth."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self):
        with session_scope(self.settings.db_url) as s:
            counts = crud.count_by_status(s)
            queued = crud.queued_by_queue(s)
            durations = crud.recent_durations(s, utcnow() - timedelta(hours=24))
        jobs = GaugeMetricFamily("divmerge_jobs", "jobs by status", labels=["status"])
        for st in STATUSES:
            jobs.add_metric([st.value], counts.get(st, 0))
        yield jobs
        depth = GaugeMetricFamily("divmerge_queue_depth", "queued jobs per queue", labels=["queue"])
        for q in sorted({self.settings.gpu_queue, self.settings.cpu_queue, *queued}):
            depth.add_metric([q], queued.get(q, 0))
        yield depth
        hist = HistogramMetricFamily(
            "divmerge_job_duration_seconds", "run time of jobs finished in the last 24 h", labels=["status"]
        )
        for st in FINISHED:
            vals = [d for s_, d in durations if s_ == st]
            buckets = [(str(b), sum(1 for v in vals if v <= b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(vals)))
            hist.add_metric([st.value], buckets, sum(vals))
        yield hist


class Metrics:
    def __init__(self, settings: Settings):
        self.registry = CollectorRegistry()
        self.registry.register(JobCollector(settings))
        self.http = Histogram(
            "divmerge_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def middleware(self, request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.http.labels(request.method, path, str(response.status_code)).observe(time.perf_counter() - start)
        return response
