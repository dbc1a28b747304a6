"""Prometheus metrics (`GET /metrics`): every metric tinkerd exports is defined here.

Each app has its own `CollectorRegistry` (several apps in one process never collide). Three
sources feed it:

- `MetricsMiddleware`: requests and latency per endpoint (the route template, never the raw
  path) and status; HTTP errors by category (4xx user, 5xx server).
- `ServiceMetrics` (the service's hooks, see `service_base._submit` / `_callbacks`): futures
  created / completed / failed by kind, pending futures, failed futures by category,
  recoveries and replays (api/recovery.py). It also hands each request's engine timings to
  the session trace recorder (api/traces.py).
- `EngineMetrics` (an engine `Telemetry`, called by each scheduler): queue wait per model,
  tokens trained and sampled, micro-batch rows / tokens / padding ratio, sampling batch
  sizes, prompt prefix-cache lookups and hits (hit rate: hits_total / lookups_total); and,
  read at scrape time, queue depth and adapters / snapshots in memory.

Access: `/metrics` is served when `metrics_enabled` (default on). With `TINKERD_METRICS_TOKEN`
set, every scrape needs `Authorization: Bearer <token>` (Prometheus: `authorization:
credentials: <token>`); without it, only loopback clients are served. Otherwise 401
(no credentials) or 403 (wrong token, or not loopback), with a JSON body.
"""

import contextlib
import hmac
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from threading import Lock
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.api.traces import TraceRecorder
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.engine.telemetry import BatchPart, Telemetry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Ops queued and not yet started that are remembered for their queue wait at most.
_MAX_QUEUED = 100_000


class Metrics:
    """The app's registry and every metric in it."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "tinkerd_http_requests",
            "HTTP requests by endpoint (route template) and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "tinkerd_http_request_duration_seconds",
            "HTTP request latency by endpoint and status (long-polls included)",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.futures_created = Counter(
            "tinkerd_futures_created", "Futures created, by kind", ["kind"], registry=r
        )
        self.futures_completed = Counter(
            "tinkerd_futures_completed", "Futures completed, by kind", ["kind"], registry=r
        )
        self.futures_failed = Counter(
            "tinkerd_futures_failed",
            "Futures failed, by kind and category (user | server)",
            ["kind", "category"],
            registry=r,
        )
        self.futures_pending = Gauge(
            "tinkerd_futures_pending", "Futures queued or running now", registry=r
        )
        self.errors = Counter(
            "tinkerd_errors",
            "Errors by category (user | server) and source (http: 4xx/5xx answers; "
            "future: failed futures)",
            ["category", "source"],
            registry=r,
        )
        self.recoveries = Counter(
            "tinkerd_recoveries",
            "Restarts that found work to recover (runs to replay or pending requests)",
            registry=r,
        )
        self.replays = Counter(
            "tinkerd_replayed_requests",
            "Logged requests queued again after a restart, by what (training | sample)",
            ["what"],
            registry=r,
        )
        self.recovery_failed = Counter(
            "tinkerd_recovery_failed_requests",
            "Requests pending at a restart that could not be re-run (failed)",
            registry=r,
        )
        self.queue_wait = Histogram(
            "tinkerd_queue_wait_seconds",
            "Time from queueing an op to the start of its execution, per model",
            ["model"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.tokens_trained = Counter(
            "tinkerd_tokens_trained",
            "Tokens run through forward_backward (forward-only excluded), per model",
            ["model"],
            registry=r,
        )
        self.tokens_forward = Counter(
            "tinkerd_tokens_forward",
            "Tokens run through forward_backward, forward-only included, per model",
            ["model"],
            registry=r,
        )
        self.tokens_sampled = Counter(
            "tinkerd_tokens_sampled",
            "Tokens generated by sampling, per model",
            ["model"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "tinkerd_micro_batch_rows",
            "Rows (datums) per forward_backward micro-batch",
            ["model"],
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "tinkerd_micro_batch_tokens",
            "Tokens (unpadded) per forward_backward micro-batch",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding = Histogram(
            "tinkerd_micro_batch_padding_ratio",
            "Share of a micro-batch's padded tokens that are padding",
            ["model"],
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "tinkerd_micro_batch_requests",
            "Requests sharing one forward_backward micro-batch",
            ["model"],
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.sample_batch_requests = Histogram(
            "tinkerd_sample_batch_requests",
            "Sample requests per sampling batch",
            ["model"],
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.prefix_lookups = Counter(
            "tinkerd_prefix_cache_lookups",
            "Sample prompts looked up in the prompt prefix cache",
            ["model"],
            registry=r,
        )
        self.prefix_hits = Counter(
            "tinkerd_prefix_cache_hits",
            "Sample prompts whose prefix KV came from the prefix cache",
            ["model"],
            registry=r,
        )
        self.snapshot_state: dict[str, tuple[int, int]] = {}  # model -> (count, bytes)
        self._schedulers: Callable[[], Mapping[str, ModelScheduler]] = dict
        r.register(_EngineCollector(self))

    def watch(self, schedulers: Mapping[str, ModelScheduler]) -> None:
        """Read queue depth and memory from these schedulers at scrape time."""
        self._schedulers = lambda: schedulers

    def schedulers(self) -> Mapping[str, ModelScheduler]:
        return self._schedulers()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges read from the schedulers when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        families = {
            name: GaugeMetricFamily(name, doc, labels=["model"])
            for name, doc in (
                ("tinkerd_queue_depth", "Ops queued and not yet started, per model"),
                ("tinkerd_runs_in_memory", "Training runs whose adapters are in memory"),
                ("tinkerd_run_memory_bytes", "Adapter weights of runs in memory (bytes)"),
                ("tinkerd_snapshots_in_memory", "Sampler snapshots in memory"),
                ("tinkerd_snapshot_memory_bytes", "Sampler snapshot weights in memory (bytes)"),
                ("tinkerd_adapters_in_memory", "Adapters in memory: runs and snapshots"),
            )
        }
        for model, scheduler in self.metrics.schedulers().items():
            runs = scheduler.loaded_runs()
            run_bytes = 0
            for run in runs:
                with contextlib.suppress(Exception):  # released meanwhile
                    run_bytes += scheduler.adapter_bytes(run)
            snaps, snap_bytes = self.metrics.snapshot_state.get(model, (0, 0))
            values = {
                "tinkerd_queue_depth": scheduler.queued(),
                "tinkerd_runs_in_memory": len(runs),
                "tinkerd_run_memory_bytes": run_bytes,
                "tinkerd_snapshots_in_memory": snaps,
                "tinkerd_snapshot_memory_bytes": snap_bytes,
                "tinkerd_adapters_in_memory": len(runs) + snaps,
            }
            for name, value in values.items():
                families[name].add_metric([model], value)
        yield from families.values()
        yield from self._replicas()

    def _replicas(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """Workers by state, per model (one in-process worker, or the router's replicas), and
        losses so far (each loss moves a replica's epoch on)."""
        states = GaugeMetricFamily(
            "tinkerd_replicas", "Worker replicas by state", labels=["model", "state"]
        )
        losses = CounterMetricFamily(
            "tinkerd_replica_losses",
            "Worker replicas lost (process or node died)",
            labels=["model"],
        )
        for model, scheduler in self.metrics.schedulers().items():
            counts = dict.fromkeys(("ready", "restarting", "lost"), 0)
            replicas = getattr(scheduler, "replicas", [scheduler])
            for replica in replicas:
                if not replica.lost:
                    counts["ready"] += 1
                elif getattr(replica.handle, "dead", False):
                    counts["lost"] += 1
                else:
                    counts["restarting"] += 1
            for state, n in counts.items():
                states.add_metric([model, state], n)
            losses.add_metric([model], sum(r.epoch for r in replicas))
        yield states
        yield losses


class EngineMetrics(Telemetry):
    """The scheduler's observer for metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._queued: OrderedDict[str, float] = OrderedDict()
        self._lock = Lock()

    def op_queued(self, model: str, request_id: str, at: float) -> None:
        with self._lock:
            self._queued[request_id] = at
            while len(self._queued) > _MAX_QUEUED:
                self._queued.popitem(last=False)

    def op_started(self, model: str, request_id: str, at: float) -> None:
        with self._lock:
            queued = self._queued.pop(request_id, None)
        if queued is not None:
            self.m.queue_wait.labels(model).observe(max(0.0, at - queued))

    def micro_batch(
        self,
        model: str,
        start: float,
        end: float,
        parts: list[BatchPart],
        padded_tokens: int,
        trained_tokens: int,
    ) -> None:
        m = self.m
        rows = sum(p.rows for p in parts)
        tokens = sum(p.tokens for p in parts)
        m.batch_rows.labels(model).observe(rows)
        m.batch_tokens.labels(model).observe(tokens)
        m.batch_requests.labels(model).observe(len(parts))
        if padded_tokens > 0:
            m.batch_padding.labels(model).observe(1.0 - tokens / padded_tokens)
        m.tokens_trained.labels(model).inc(trained_tokens)
        m.tokens_forward.labels(model).inc(tokens)

    def sample_batch(self, model: str, start: float, end: float, parts: list[BatchPart]) -> None:
        self.m.sample_batch_requests.labels(model).observe(len(parts))
        self.m.tokens_sampled.labels(model).inc(sum(p.sampled for p in parts))

    def snapshots(self, model: str, count: int, total_bytes: int) -> None:
        self.m.snapshot_state[model] = (count, total_bytes)

    def prefix_cache(self, model: str, lookups: int, hits: int) -> None:
        self.m.prefix_lookups.labels(model).inc(lookups)
        self.m.prefix_hits.labels(model).inc(hits)


class ServiceHooks:
    """What the service reports about its futures (service_base `_submit` / `_callbacks`,
    api/recovery.py). This base does nothing; `ServiceMetrics` is the real one."""

    def created(self, request_id: str, user: str, kind: str) -> None:
        """A new future was stored and its op queued."""

    def replayed(self, request_id: str, user: str, kind: str, pending: bool) -> None:
        """A logged future's op was queued again after a restart."""

    def finished(self, request_id: str, status: str, category: str | None = None) -> dict[str, Any]:
        """A future finishes now: the timing fields to store with its outcome."""
        return {}

    def recovered(self, runs: int, replayed: int, failed: int, samples: int) -> None:
        """A restart's recovery was planned (see recovery.recover)."""


class ServiceMetrics(ServiceHooks):
    def __init__(self, metrics: Metrics, traces: TraceRecorder) -> None:
        self.m = metrics
        self.traces = traces

    def created(self, request_id: str, user: str, kind: str) -> None:
        self.m.futures_created.labels(kind).inc()
        self.m.futures_pending.inc()
        self.traces.track(request_id, user, kind)

    def replayed(self, request_id: str, user: str, kind: str, pending: bool) -> None:
        self.m.replays.labels("sample" if kind == "sample" else "training").inc()
        if pending:
            self.m.futures_pending.inc()
            self.traces.track(request_id, user, kind)

    def finished(self, request_id: str, status: str, category: str | None = None) -> dict[str, Any]:
        kind, timing = self.traces.take(request_id)
        if kind is not None:
            self.m.futures_pending.dec()
        kind = kind or "unknown"
        if status == "complete":
            self.m.futures_completed.labels(kind).inc()
        else:
            self.m.futures_failed.labels(kind, category or "unknown").inc()
            self.m.errors.labels(category or "unknown", "future").inc()
        return timing

    def recovered(self, runs: int, replayed: int, failed: int, samples: int) -> None:
        if runs or failed or samples:
            self.m.recoveries.inc()
        self.m.recovery_failed.inc(failed)


# -- HTTP ---------------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts every HTTP request by method, route template and status, with its latency
    (until the response is fully sent)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (scope.get("method", ""), template, str(status))
            self.metrics.http_requests.labels(*labels).inc()
            self.metrics.http_latency.labels(*labels).observe(time.perf_counter() - start)
            if status >= 400:
                category = "server" if status >= 500 else "user"
                self.metrics.errors.labels(category, "http").inc()


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics`, access-checked (see the module docstring)."""
    state = request.app.state
    if not state.metrics_enabled:
        return JSONResponse({"detail": "metrics are disabled on this server"}, status_code=404)
    token: str | None = state.metrics_token
    if token:
        scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return JSONResponse(
                {"detail": "metrics need 'Authorization: Bearer <TINKERD_METRICS_TOKEN>'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return JSONResponse({"detail": "wrong metrics token"}, status_code=403)
    elif not _loopback(request.client.host if request.client else None):
        return JSONResponse(
            {
                "detail": "metrics are served to loopback clients only; set "
                "TINKERD_METRICS_TOKEN to let others scrape with a bearer token"
            },
            status_code=403,
        )
    metrics: Metrics = state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
