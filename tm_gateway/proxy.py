"""One request through the gateway: the stages of tm_gateway/stages run in order (auth, parse, classify,
route, cache, call or cascade, relay), and exactly one row is left in the request log however it ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response
from yarl import URL

from tm_gateway import fallback
from tm_gateway.dispatch import Dispatcher
from tm_gateway.ids import uuid7
from tm_gateway.keepwarm import KeepWarm
from tm_gateway.logins import LoginGuard
from tm_gateway.requestlog import RequestLog
from tm_gateway.stages import auth, cache, call, cascade, classify, count, guard, limits, parse, route
from tm_gateway.stages.context import ApiFormat, BadRequest, Ctx, error_response
from tm_gateway.stages.log import Row, log_bodiless
from tm_gateway.state import SharedState
from tm_resources.completions import TextClient
from tm_resources.config import Config
from tm_resources.events import EventSink
from tm_resources.providers import endpoints as provider_endpoints
from tm_resources.registry import with_registry

__all__ = ["ApiFormat", "Proxy", "error_response"]

log = logging.getLogger(__name__)

_NOT_PARAMS = frozenset(("model", "messages", "system"))

Answer = Callable[[Request, Ctx], Awaitable[Response]]


def _headers(request: Request) -> dict[str, str]:
    # One pass over the raw headers: each lookup on Starlette's Headers scans the whole list.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}


class Proxy:
    """What the stages share across requests: configuration, the provider session and endpoints,
    the state re-read from Postgres, the request log, and the optional classifier, cache and dispatcher."""

    def __init__(
        self,
        *,
        config: Config,
        session: aiohttp.ClientSession,
        shared: SharedState,
        request_log: RequestLog,
        scrub: Callable[[str], str],
        classify: Callable[[str], tuple[Any, str, float]] | None = None,
        cache_pool: AsyncConnectionPool | None = None,
        embed: Callable[[str], Any] | None = None,
        dispatcher: Dispatcher | None = None,
        events: EventSink | None = None,
    ):
        self.config = config
        self.session = session
        self.shared = shared
        self.cooldowns = fallback.Cooldowns(config.gateway.cooldown_s)
        self._base_config = config
        self._registry_seen = -1
        self.timeouts: dict[str, aiohttp.ClientTimeout] = {}
        self._sync_registry()
        self.request_log = request_log
        self.scrub = scrub
        # prompt -> (vector, task type, confidence); CPU work, run off the event loop.
        self.classify = classify
        # Postgres connections for cache lookups (None: no cache), and prompt -> vector for the
        # semantic cache of requests that name their model (cache.semantic.named_models).
        self.cache_pool = cache_pool
        self.embed = embed
        # Chooses an agent for requests addressed to the dispatcher (None: no agent has intents).
        self.dispatcher = dispatcher
        # PostHog (alerts; a no-op without POSTHOG_API_KEY): the SDK queues and sends from its own thread.
        self.events = events or EventSink(None)
        # Rate limits and loop detection (None: nothing to enforce); opened in the app's lifespan.
        self.limits: limits.Limits | None = None
        # Anthropic prompt prefixes re-sent before their cache expires (None: cache.keep_warm is off).
        self.keep_warm: KeepWarm | None = None
        self.budgets = guard.Spend(config, shared, self.events)
        self.metrics: Any = None  # tm_gateway.metrics.GatewayMetrics, attached when the app starts
        self.logins = LoginGuard(free=config.gateway.login_free_failures,
                                 max_backoff_s=config.gateway.login_backoff_max_s)
        # Off the proxying path (the LLM tier classifier): a client per provider, opened at first use.
        self.text_clients: dict[str, TextClient] = {}

    async def aclose(self) -> None:
        for client in self.text_clients.values():
            await client.aclose()

    def _sync_registry(self) -> None:
        """Serve the deployed fine-tunes too: rebuilt only when the registry was re-read."""
        if self.shared.registry_version == self._registry_seen:
            return
        self._registry_seen = self.shared.registry_version
        self.config = with_registry(self._base_config, self.shared.registry)
        self.endpoints = provider_endpoints(self.config)
        # Parsed once: aiohttp takes a URL object as it is, and parses a string on every call.
        self.urls = {name: URL(ep.url) for name, ep in self.endpoints.items()}
        self.timeouts = {
            name: aiohttp.ClientTimeout(total=None, connect=ep.connect_timeout_s, sock_read=ep.timeout_s)
            for name, ep in self.endpoints.items()
        }

    def authenticate(self, request: Request, headers: dict[str, str] | None = None) -> tuple[str, str] | None:
        return self.shared.lookup(auth.key_of(headers if headers is not None else request.headers))

    def login(self, request: Request, fmt: str, headers: dict[str, str] | None = None) -> tuple[str, str] | Response:
        return auth.login(self, request, fmt, headers if headers is not None else request.headers)

    def log_bodiless(self, request: Request, fmt: str, ident: tuple[str, str], status: int, *,
                     started: float | None = None, **fields: Any) -> Any:
        return log_bodiless(self.request_log, request, fmt, ident, status, started=started, **fields)

    async def count_tokens(self, request: Request, ctx: Ctx) -> Response:
        return await count.count_tokens(self, request, ctx)

    async def handle(self, request: Request, fmt: str, answer: Answer | None = None,
                     held: list[Row] | None = None) -> Response:
        """One request, whoever answers it (`answer`, by default a model call): authenticated, and
        logged in exactly one row however it ends. With `held`, the row is appended there and handed to
        the log only when the caller calls its `release()`, after sending the response (HotPaths)."""
        started = time.perf_counter()
        fmt = ApiFormat(fmt)
        self._sync_registry()
        h = _headers(request)
        ident = auth.login(self, request, fmt, h)
        if isinstance(ident, Response):
            return ident
        rid = uuid7()
        row = Row(
            {
                "id": rid,
                "ts": datetime.now(UTC),
                "user_id": ident[1],
                "api_key_id": ident[0],
                "api_format": fmt.value,
                "endpoint": request.scope["path"],
                "session_id": h.get("x-tm-session") or h.get("x-session-id"),
                "agent": h.get("x-tm-agent"),
                "stream": False,
            },
            started,
            self.request_log,
            hold=held is not None,
        )
        if held is not None:
            held.append(row)
        ctx = Ctx(fmt, h, {"x-tm-request-id": str(rid)}, row)
        try:
            return await (answer or self._handle)(request, ctx)
        except BadRequest as err:
            row.done(status=err.status, error_class=err.error_class, error_message=err.message)
            return error_response(fmt, err.status, err.message, ctx.reply_headers)
        except BaseException as err:
            if not isinstance(err, Exception):
                row.done(status=499, error_class="cancelled", error_message="the request was cancelled")
                raise
            log.exception("gateway error on request %s", rid)
            row.done(status=500, error_class="gateway_error", error_message=type(err).__name__)
            return error_response(fmt, 500, f"internal gateway error (request {rid})", ctx.reply_headers)

    async def _handle(self, request: Request, ctx: Ctx) -> Response:
        """The completion endpoints' stages, in order."""
        body, alias = await parse.parse(self, request, ctx)
        if (refused := await limits.check(self, ctx, body)) is not None:
            return refused
        body, classified = await classify.agent(self, ctx, body)
        system, prompt = parse.system_and_prompt(ctx.fmt, body)
        # The row's prompt stays this turn's own: the loop would read a task repeated on each tool
        # turn as the person asking again.
        chosen = await route.choose_model(self, ctx, body["model"], prompt, classified,
                                          "" if prompt else parse.task_text(body))
        r = ctx.row.data
        if alias:
            r["route_reason"] = f"{alias}; {r['route_reason']}"
        r.update(stream=ctx.stream, system=system, prompt=prompt, messages=orjson.dumps(body["messages"]).decode(),
                 params=orjson.dumps({k: v for k, v in body.items() if k not in _NOT_PARAMS}).decode())
        if ctx.fmt == "anthropic" and r["session_id"] is None:
            r["session_id"] = parse.claude_code_session(body.get("metadata"), ctx.client_headers)
        ctx.reply_headers["x-tm-route"] = chosen.route
        if isinstance(guarded := await guard.guard(self, ctx, body, chosen), Response):
            return guarded
        chosen = guarded
        if self.cache_pool is not None:
            hit = await cache.cache_lookup(self, ctx, body)
            if hit is not None:
                return cache.serve_cached(ctx, hit, body)
        if chosen.escalate_to and cascade.applies(body):
            return await cascade.cascade(self, ctx, body, chosen, prompt)
        return await call.answer(self, ctx, body, chosen.model, list(chosen.chain))
