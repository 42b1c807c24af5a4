"""Prometheus metrics: counted from the request log's writer thread as each row is stored, added up across
worker processes (prometheus-client's multiprocess mode), and served at GET /metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from starlette.requests import Request
from starlette.responses import Response

from tm_gateway.multiproc import MULTIPROC_ENV, multiprocess_dir

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy
    from tm_gateway.requestlog import RequestLog

log = logging.getLogger(__name__)

TOKEN_ENV = "TM_METRICS_TOKEN"

# Seconds. Local models answer in tens of milliseconds, frontier ones in tens of seconds.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKEN_COLUMNS = (("input", "input_tokens"), ("output", "output_tokens"),
                  ("cache_read", "cache_read_tokens"), ("cache_write", "cache_write_tokens"))
_LOG_OUTCOMES = ("written", "spooled", "rejected", "dropped")


def _route_kind(route: str | None) -> str:
    # "rule:escalate:coding" -> "rule": a label per rule would grow with every rule the loop writes.
    return route.split(":", 1)[0] if route else "none"


def _fallbacks(attempts: object) -> list[str]:
    """The failure class of each attempt the gateway moved on from (another key, a retry, the next model)."""
    if isinstance(attempts, str):
        if '"failure"' not in attempts:
            return []
        attempts = orjson.loads(attempts)
    if not isinstance(attempts, list):
        return []
    tried = [a for a in attempts if isinstance(a, dict) and ("status" in a or "failure" in a)]
    return [str(a["failure"]) for a in tried[:-1] if a.get("failure")]


class GatewayMetrics:
    """The gateway's metrics for one process. In multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before
    prometheus_client was imported) every process writes its own files and a scrape adds them up;
    otherwise they live in this object's own registry, so two apps in one process (tests) stay apart."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.dir = multiprocess_dir()
        if self.dir is not None and values.ValueClass is values.MutexValue:
            # Set after prometheus_client was imported (not by `tm gateway`): the counts are this process's.
            log.warning("metrics: %s is set but prometheus_client was imported before it; "
                        "GET /metrics reports this process only", MULTIPROC_ENV)
            self.dir = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tm_requests", "Requests that left a row, by answering model, provider, "
                                "what routed them and HTTP status", ["model", "provider", "route", "status"],
                                registry=r)
        self.tokens = Counter("tm_tokens", "Tokens by model, provider and direction (input, output, cache_read, "
                              "cache_write)", ["model", "provider", "direction"], registry=r)
        self.cost = Counter("tm_cost_usd", "What the requests cost, in US dollars, at the configured prices",
                            ["model", "provider"], registry=r)
        self.baseline = Counter("tm_frontier_baseline_cost_usd", "What the same requests would have cost on the "
                                "configured frontier model, in US dollars", ["model", "provider"], registry=r)
        self.duration = Histogram("tm_request_duration_seconds", "Time from receiving a request to its end",
                                  ["model", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tm_time_to_first_token_seconds", "Streams: time from receiving a request to its "
                              "first byte of answer", ["model", "provider"], buckets=TTFT_BUCKETS, registry=r)
        self.cache_hits = Counter("tm_cache_hits", "Requests answered from the cache, by kind (exact, semantic)",
                                  ["kind"], registry=r)
        self.fallbacks = Counter("tm_fallbacks", "Failed provider attempts the gateway moved on from (another "
                                 "key, a retry, the next model), by failure class", ["failure_class"], registry=r)
        self.log_rows = Counter("tm_log_rows", "Request-log rows by what became of them (written to Postgres, "
                                "spooled to disk, rejected by Postgres, dropped with the disk folder full)",
                                ["outcome"], registry=r)
        self.queue = Gauge("tm_log_queue_rows", "Rows waiting for the request log's writer thread",
                           multiprocess_mode="livesum", registry=r)
        self.spooled = Gauge("tm_log_spool_bytes", "Bytes of rows on disk waiting for Postgres (spool folder, "
                             "shared by the workers)", multiprocess_mode="livemostrecent", registry=r)
        self.rejected = Gauge("tm_log_rejected_bytes", "Bytes of rows Postgres refused, waiting for "
                              "`tm log replay-rejected`", multiprocess_mode="livemostrecent", registry=r)
        self.rules = Gauge("tm_routing_rules_in_force", "Routing rules the gateway obeys (the newest hour's "
                           "active rules)", multiprocess_mode="livemostrecent", registry=r)
        self._log_seen = dict.fromkeys(_LOG_OUTCOMES, 0)
        self._sync_lock = threading.Lock()
        self._counters = {"tokens": self.tokens, "cost": self.cost, "baseline": self.baseline,
                          "cache_hits": self.cache_hits, "fallbacks": self.fallbacks}
        self._histograms: dict[tuple[str, str], tuple] = {}

    # -- the writer thread -----------------------------------------------------------------------

    def observe(self, request_log: RequestLog, rows: list[dict]) -> None:
        """Count a batch of rows (called by the request log's writer thread after storing it). Counters are
        summed over the batch first: in multiprocess mode each increment is a locked write to a file."""
        requests: dict[tuple, int] = defaultdict(int)
        sums: dict[tuple, float] = defaultdict(float)  # (counter name, *labels) -> amount
        for row in rows:
            model, provider = row.get("model") or "none", row.get("provider") or "none"
            requests[(model, provider, _route_kind(row.get("route")), str(row.get("status")))] += 1
            for direction, column in _TOKEN_COLUMNS:
                if n := row.get(column):
                    sums[("tokens", model, provider, direction)] += n
            if c := row.get("cost_usd"):
                sums[("cost", model, provider)] += c
            if b := row.get("baseline_cost_usd"):
                sums[("baseline", model, provider)] += b
            histograms = self._histograms.get((model, provider))
            if histograms is None:
                histograms = self._histograms[(model, provider)] = (self.duration.labels(model, provider),
                                                                    self.ttft.labels(model, provider))
            if (ms := row.get("latency_ms")) is not None:
                histograms[0].observe(ms / 1000)
            if (ms := row.get("ttft_ms")) is not None:
                histograms[1].observe(ms / 1000)
            if kind := row.get("cache_hit"):
                sums[("cache_hits", kind)] += 1
            for failure in _fallbacks(row.get("attempts")):
                sums[("fallbacks", failure)] += 1
        for labels, n in requests.items():
            self.requests.labels(*labels).inc(n)
        for key, amount in sums.items():
            self._counters[key[0]].labels(*key[1:]).inc(amount)
        self._sync_gauges(request_log)

    def _sync_gauges(self, request_log: RequestLog) -> None:
        with self._sync_lock:  # the writer thread and a scrape's thread both come here
            for outcome in _LOG_OUTCOMES:
                now = getattr(request_log, f"rows_{outcome}")
                if now != self._log_seen[outcome]:
                    self.log_rows.labels(outcome).inc(now - self._log_seen[outcome])
                    self._log_seen[outcome] = now
        self.queue.set(request_log.queued())
        self.rules.set(len(self.proxy.shared.rules))

    # -- the scrape ------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        request_log = self.proxy.request_log
        self._sync_gauges(request_log)
        # Read at scrape time: the folders are shared, so any worker's reading is everyone's.
        self.spooled.set(request_log.spooled_on_disk())
        self.rejected.set(request_log.rejected_on_disk())
        if self.dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.dir))
        return generate_latest(registry)

    def close(self) -> None:
        """This process is ending: its live gauges (queue depth, rules) leave the sum; its counts stay."""
        if self.dir is not None:
            multiprocess.mark_process_dead(os.getpid(), str(self.dir))


def attach(proxy: Proxy) -> None:
    """Count every row the proxy's request log stores, and serve the counts at /metrics."""
    proxy.metrics = GatewayMetrics(proxy)
    proxy.request_log.observers.append(proxy.metrics.observe)


def _authorized(request: Request) -> bool:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus' text format. Open unless TM_METRICS_TOKEN is set; then `Authorization: Bearer <token>`.
    The token is not an API key: a scrape is not a request of the team's and leaves no row."""
    from tm_gateway.app import caller_format
    from tm_gateway.proxy import error_response

    if not _authorized(request):
        return error_response(caller_format(request), 401,
                              f"GET /metrics wants `Authorization: Bearer <token>` ({TOKEN_ENV} is set)",
                              {"www-authenticate": "Bearer"})
    proxy: Proxy = request.state.proxy
    body = await asyncio.to_thread(proxy.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
