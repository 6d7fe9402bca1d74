"""Prometheus metrics and the access log: one record per request, written when its response closes.

Each app has its own CollectorRegistry (in app.extensions, never prometheus_client's global
one), so two apps in one process, as in the tests, count apart. Every metric carries a
`model` label. Counters that the request path knows (requests, tokens, latencies) are
updated when a response closes, streams included; the scheduler's own state (queue depth,
active sequences, KV cells, prefix-cache hits) is read at scrape time by a collector, so
the worker thread never touches Prometheus.

Names follow Prometheus conventions: `llamabox_` prefix, base units (seconds), `_total`
on counters (prometheus_client adds it).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

access_log = logging.getLogger("llamabox.access")

# Seconds. TTFT spans a cached prompt on a tiny model (ms) to a long prompt on 7B (minutes).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class RequestRecord:
    """What a handler learns about its request; the access log and the counters read it at close."""
    run_id: str
    endpoint: str                 # the route's rule ("/v1/chat/completions"), never the raw path
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    status: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float | None = None   # submit -> first token sampled
    tpot_s: float | None = None   # mean seconds per output token after the first
    stream: bool = False


class _SchedulerCollector:
    """Reads each loaded runtime's scheduler at scrape time."""

    def __init__(self, runtimes: Callable[[], list]):
        self.runtimes = runtimes

    def collect(self):
        q = GaugeMetricFamily("llamabox_queue_depth", "Requests admitted and waiting for room", labels=["model"])
        act = GaugeMetricFamily("llamabox_active_sequences", "Sequences generating", labels=["model"])
        used = GaugeMetricFamily("llamabox_kv_cells_used", "KV cells reserved by requests and the prefix cache", labels=["model"])
        total = GaugeMetricFamily("llamabox_kv_cells_total", "KV cells in the context", labels=["model"])
        hits = CounterMetricFamily("llamabox_prefix_cache_hits", "Prompts that reused a cached prefix", labels=["model"])
        reused = CounterMetricFamily("llamabox_prefix_cache_reused_tokens", "Prompt tokens copied from the prefix cache",
                                     labels=["model"])
        for rt in self.runtimes():
            m = rt.info.model_id
            g = rt.scheduler.gauges()
            st = rt.scheduler.stats
            q.add_metric([m], g["waiting"])
            act.add_metric([m], g["active_sequences"])
            used.add_metric([m], g["kv_cells_reserved"])
            total.add_metric([m], g["kv_cells_total"])
            hits.add_metric([m], st["prefix_cache_hits"])
            reused.add_metric([m], st["prompt_tokens_reused"])
        yield from (q, act, used, total, hits, reused)


class Metrics:
    def __init__(self, runtimes: Callable[[], list], log_format: str = "text"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llamabox_requests", "HTTP requests answered", ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llamabox_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=r)
        self.generated_tokens = Counter("llamabox_generated_tokens", "Tokens generated for answered requests", ["model"], registry=r)
        self.ttft = Histogram("llamabox_time_to_first_token_seconds", "From admission to the first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llamabox_time_per_output_token_seconds", "Mean time per token after the first", ["model"],
                              buckets=_TPOT_BUCKETS, registry=r)
        self.duration = Histogram("llamabox_request_duration_seconds", "From the request's arrival to its response closing",
                                  ["model", "endpoint"], buckets=_REQUEST_BUCKETS, registry=r)
        self.load_seconds = Gauge("llamabox_model_load_seconds", "Time the model took to load", ["model"], registry=r)
        self.loads = Counter("llamabox_model_loads", "Model loads", ["model"], registry=r)
        self.unloads = Counter("llamabox_model_unloads", "Model unloads", ["model"], registry=r)
        r.register(_SchedulerCollector(runtimes))
        self.log_format = log_format

    def model_loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).set(seconds)

    def model_unloaded(self, model: str) -> None:
        self.unloads.labels(model).inc()

    def finish(self, rec: RequestRecord) -> None:
        """Count a closed response and write its access-log line."""
        total = time.monotonic() - rec.started
        model = rec.model or "-"
        self.requests.labels(model, rec.endpoint, str(rec.status)).inc()
        self.duration.labels(model, rec.endpoint).observe(total)
        if rec.prompt_tokens or rec.generated_tokens:
            self.prompt_tokens.labels(model).inc(rec.prompt_tokens)
            self.generated_tokens.labels(model).inc(rec.generated_tokens)
        if rec.ttft_s is not None:
            self.ttft.labels(model).observe(rec.ttft_s)
        if rec.tpot_s is not None:
            self.tpot.labels(model).observe(rec.tpot_s)
        fields = {"run_id": rec.run_id, "model": model, "endpoint": rec.endpoint, "status": rec.status,
                  "prompt_tokens": rec.prompt_tokens, "generated_tokens": rec.generated_tokens,
                  "ttft_ms": None if rec.ttft_s is None else round(rec.ttft_s * 1000, 1), "total_ms": round(total * 1000, 1),
                  "stream": rec.stream}
        if self.log_format == "json":
            access_log.info(json.dumps(fields))
        else:
            access_log.info(" ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items()))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def record_job(rec: RequestRecord, model: str, job, n_prompt: int, result) -> None:
    """Fill a record from a finished job (its Result and the scheduler's timestamps)."""
    rec.model = model
    rec.prompt_tokens = n_prompt
    rec.generated_tokens = sum(c.generated_tokens for c in result.completions)
    if job.first_token_at is not None:
        rec.ttft_s = job.first_token_at - job.submitted_at
        longest = max((c.generated_tokens for c in result.completions), default=0)
        if job.finished_at is not None and longest > 1:
            rec.tpot_s = (job.finished_at - job.first_token_at) / (longest - 1)
