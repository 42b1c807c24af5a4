"""The Starlette app: auth -> parse -> resolve model -> call the provider -> answer in the caller's format -> log."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
import numpy as np
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from tm_gateway import analytics, metrics
from tm_gateway.dashboard import Dashboard
from tm_gateway.keepwarm import KeepWarm
from tm_gateway.learned import RouterSettings
from tm_gateway.openapi import openapi_description
from tm_gateway.proxy import Proxy, error_response
from tm_gateway.requestlog import RequestLog
from tm_gateway.stages.limits import Limits
from tm_gateway.stages.log import Row
from tm_gateway.state import SharedState
from tm_resources import cache
from tm_resources.config import Config
from tm_resources.events import EventSink
from tm_resources.providers import SecretScrubber

log = logging.getLogger(__name__)

_GC_YOUNG = int(os.environ.get("TM_GC_YOUNG", "20000"))  # tunable for benchmarks (bench/gateway_latency.py --ab-env)


class State(TypedDict):
    proxy: Proxy


@dataclass
class GatewaySettings:
    config: Config
    database_url: str
    home: Path


def prompt_classifier(config: Config) -> Callable[[str], tuple[np.ndarray, str, float]]:
    """prompt -> (its vector, task type, confidence), as the loop's task_types asset computes them."""
    from tm_resources.embedder import get_embedder
    from tm_resources.tasks import TaskClassifier, load_seeds

    embedder = get_embedder()
    classifier = TaskClassifier(config.loop.task_seeds or load_seeds(), embedder)

    def classify(prompt: str) -> tuple[np.ndarray, str, float]:
        vec = embedder.embed_one(prompt)
        ((task_type, confidence),) = classifier.classify(vec[None, :])
        return vec, task_type, confidence

    return classify


def create_app(settings: GatewaySettings) -> HotPaths:
    config = settings.config
    dashboard = Dashboard(config, settings.database_url, settings.home) if config.dashboard.enabled else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        learned = config.routing.learned
        shared = SharedState(
            settings.database_url, config.gateway.refresh_interval_s, learn_router=learned.enabled,
            router_models=list(config.models),
            router_settings=RouterSettings(window_h=learned.window_h, min_rows=learned.min_rows, k=learned.k,
                                           temperature=learned.temperature, prior_weight=learned.prior_weight),
            exact_ttl_s=config.cache.exact_ttl_s if config.cache.enabled else None,
            exact_capacity=config.cache.exact_filter_capacity,
            semantic_window_h=config.cache.semantic.window_h
            if config.cache.enabled and config.cache.semantic.enabled else None,
            cache_scope=functools.partial(cache.scope_key, config=config))
        shared.load()
        spool = Path(config.log.spool_dir) if config.log.spool_dir else settings.home / "spool"
        request_log = RequestLog(
            settings.database_url,
            spool_dir=spool,
            batch_max_rows=config.log.batch_max_rows,
            flush_interval_s=config.log.flush_interval_ms / 1000,
            journal=config.log.journal,
            redact_secrets=config.log.redact.secrets,
            redact_pii=config.log.redact.pii,
            spool_max_bytes=config.log.spool_max_mb << 20,
            rejected_max_bytes=config.log.rejected_max_mb << 20,
        )
        # One pooled session for every upstream; limits sized for a busy replica, not the default 100.
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, ttl_dns_cache=300)
        # No cookie jar: a cookie one provider answer sets (a load balancer's) must not ride along on the
        # next user's request, and filtering a jar costs every call.
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar())
        shared.start()
        # The loop's own classifier (same code, same examples); loading the model takes a second or two.
        classify = await asyncio.to_thread(prompt_classifier, config) if config.gateway.classify_auto else None
        cache_pool = embed = None
        if config.cache.enabled:
            # A few connections for cache lookups; opened in the background, so a database that is
            # down at start-up makes lookups miss rather than the gateway fail.
            # The server ends a query the gateway has stopped waiting for (cache.configure_connection),
            # so a slow database never holds the pool's connections for long.
            cache_pool = AsyncConnectionPool(
                settings.database_url, min_size=1, max_size=4, open=False,
                configure=functools.partial(cache.configure_connection, ef_search=config.cache.semantic.hnsw_ef_search,
                                            statement_timeout_s=config.cache.lookup_timeout_s),
                kwargs={"autocommit": True}, timeout=config.cache.lookup_timeout_s, name="tm-cache")
            await cache_pool.open(wait=False)
            if config.cache.semantic.enabled:
                from tm_resources.embedder import fits_window

                await asyncio.to_thread(fits_window, ["load the tokenizer before the first lookup"])
            if config.cache.semantic.enabled and config.cache.semantic.named_models:
                from tm_resources.embedder import get_embedder

                embed = (await asyncio.to_thread(get_embedder)).embed_one
        dispatcher = None
        if any(a.intents or a.keywords for a in config.agents.values()):
            from tm_gateway.dispatch import Dispatcher
            from tm_resources.embedder import get_embedder

            dispatcher = await asyncio.to_thread(lambda: Dispatcher.from_config(config, get_embedder().embed))
        proxy = Proxy(
            config=config,
            session=session,
            shared=shared,
            request_log=request_log,
            scrub=SecretScrubber.for_config(config),
            classify=classify,
            cache_pool=cache_pool,
            embed=embed,
            dispatcher=dispatcher,
            events=EventSink.from_env(),
        )
        proxy.limits = await Limits.open(config, settings.database_url)
        proxy.keep_warm = KeepWarm.start(proxy, settings.database_url)
        app.state.proxy = proxy  # for tests that reach in
        metrics.attach(proxy)
        analytics.attach(proxy)
        # Started once its observers are in: the journal of a killed process, replayed at start, is counted.
        request_log.start()
        # What start-up loaded (the model, the libraries) lives as long as the process: moving it out
        # of the collector's reach keeps full collections from pausing requests for 100+ ms under load.
        gc.collect()
        gc.freeze()
        # A request allocates a few hundred objects, nearly all freed by reference counting as it ends; at
        # the default threshold (700) the young generation was collected every request or two for almost
        # nothing. bench/gateway_latency.py --ab-env: -5 % CPU a request at c=50, -0.03 ms at c=1.
        gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])
        try:
            yield {"proxy": proxy}
        finally:
            await shared.stop()
            if proxy.limits is not None:
                await proxy.limits.close()
            if proxy.keep_warm is not None:
                await proxy.keep_warm.close()
            await proxy.budgets.close()
            await session.close()
            await proxy.aclose()
            if cache_pool is not None:
                await cache_pool.close()
            # Every row the gateway accepted is written (or spooled) before the process ends.
            request_log.close()
            proxy.metrics.close()
            proxy.events.close()
            if dashboard is not None:
                await dashboard.close()

    async def chat_completions(request: Request) -> Response:
        return await request.state.proxy.handle(request, "openai")

    async def messages(request: Request) -> Response:
        return await request.state.proxy.handle(request, "anthropic")

    async def count_tokens(request: Request) -> Response:
        proxy: Proxy = request.state.proxy
        return await proxy.handle(request, "anthropic", proxy.count_tokens)

    async def models(request: Request) -> Response:
        proxy: Proxy = request.state.proxy
        fmt = "anthropic" if "anthropic-version" in request.headers else "openai"
        ident = proxy.login(request, fmt)
        if isinstance(ident, Response):
            return ident
        started = time.perf_counter()
        created = int(time.time())
        proxy._sync_registry()
        served = proxy.config
        # What a client may put in `model`: the machine's choices first, then every model served
        # (configured ones and deployed fine-tunes).
        names = ["auto", *sorted(served.presets), *sorted(served.models)]
        if fmt == "anthropic":
            body = {
                "data": [
                    {"type": "model", "id": n, "display_name": n,
                     "created_at": datetime.fromtimestamp(created, UTC).isoformat()}
                    for n in names
                ],
                "has_more": False,
                "first_id": names[0] if names else None,
                "last_id": names[-1] if names else None,
            }
        else:
            body = {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": created,
                     "owned_by": served.models[n].provider if n in served.models else "token-machine"}
                    for n in names
                ],
            }
        rid = proxy.log_bodiless(request, fmt, ident, 200, started=started)
        return JSONResponse(body, headers={"x-tm-request-id": str(rid)})

    async def healthz(request: Request) -> Response:
        """"ok" to anyone (a load balancer's probe); the log's counts only with a valid key."""
        proxy: Proxy = request.state.proxy
        if proxy.authenticate(request) is None:
            return JSONResponse({"status": "ok"})
        rl = proxy.request_log
        return JSONResponse({
            "status": "ok",
            "rows_written": rl.rows_written,
            "rows_spooled": rl.rows_spooled,
            "rows_rejected": rl.rows_rejected,
            "rows_dropped": rl.rows_dropped,
            "rejected_bytes_on_disk": await asyncio.to_thread(rl.rejected_on_disk),
        })

    description = openapi_description()

    async def openapi(request: Request) -> Response:
        return JSONResponse(description)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics.metrics_endpoint, methods=["GET"]),
        *([Mount("/dashboard", app=dashboard.app)] if dashboard is not None else []),
    ]
    return HotPaths(Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}))


# The two routes nearly all traffic takes, and the API each speaks.
_HOT_ROUTES = {"/v1/chat/completions": "openai", "/chat/completions": "openai", "/v1/messages": "anthropic"}


class HotPaths:
    """The completion routes go straight to the proxy; everything else (and the lifespan) through Starlette.

    Starlette's middleware stack and router held about 7% of the gateway's samples in a py-spy profile at
    concurrency 50 (docs/benchmarks.md), for nothing the proxy needs: it catches every exception itself and
    answers in the caller's format."""

    def __init__(self, app: Starlette):
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # app.state, app.routes: the Starlette app's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fmt = _HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if fmt is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        held: list[Row] = []
        try:
            response = await scope["state"]["proxy"].handle(request, fmt, held=held)
            await response(scope, receive, send)
        finally:
            # The row goes to the log once the answer is on its way (or the request is over however
            # it ended): the journal write and the settling are then off the client's time.
            for row in held:
                row.release()


def caller_format(request: Request) -> str:
    """Which API a caller speaks when the route does not say: Anthropic's SDKs send these headers."""
    h = request.headers
    anthropic = request.url.path.startswith("/v1/messages") or "anthropic-version" in h or "x-api-key" in h
    return "anthropic" if anthropic else "openai"


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, answered in the caller's own error format rather than as plain text."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = f"no such endpoint: {where} (GET /openapi.json lists them)"
    elif exc.status_code == 405:
        message = f"method not allowed: {where}; allowed: {(exc.headers or {}).get('Allow', 'none')}"
    else:
        message = exc.detail
    fmt = caller_format(request)
    proxy: Proxy | None = getattr(request.state, "proxy", None)
    ident = proxy.authenticate(request) if proxy is not None else None
    if proxy is not None and ident is not None:  # a request with a valid key leaves its row, wherever it went
        proxy.log_bodiless(request, fmt, ident, exc.status_code, error_message=message,
                           error_class="unknown_endpoint" if exc.status_code == 404 else "method_not_allowed")
    return error_response(fmt, exc.status_code, message, dict(exc.headers or {}))


def app_from_env() -> HotPaths:
    """The app as a worker process builds it: configuration and database from the environment."""
    from tm_resources.config import load_config, tm_home
    from tm_resources.db import database_url

    home = tm_home()
    return create_app(GatewaySettings(config=load_config(), database_url=database_url(home), home=home))
