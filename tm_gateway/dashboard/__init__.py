"""The read-only dashboard at /dashboard: team pages for admin keys, a customer view of their own usage for
every other key, signed in by a form and held by a signed, HttpOnly, SameSite=Strict session cookie."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tm_gateway import budgets
from tm_gateway.dashboard import queries
from tm_gateway.dashboard.queries import Scope
from tm_resources.config import Config

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
RANGES = {1: "24 hours", 7: "7 days", 30: "30 days"}
# A sign-in form holds one key: anything longer is not one.
MAX_FORM_BYTES = 4096
# Pages are never cached, and scripts come only from the package's own static folder.
_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def session_secret(home: Path) -> str:
    """The key that signs session cookies: made once and kept under TM_HOME (0600), so a restart, or another
    worker sharing the folder, keeps everyone signed in."""
    path = home / "dashboard-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        home.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker made it first
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        return secret


@dataclass(frozen=True)
class Viewer:
    key_id: str
    user_id: str
    admin: bool


def _jsonable(data: Any) -> Any:
    def default(v: Any) -> Any:
        if isinstance(v, Decimal):
            return float(v)
        raise TypeError
    return orjson.loads(orjson.dumps(data, default=default, option=orjson.OPT_NON_STR_KEYS))


Page = Callable[["Dashboard", Request, Viewer], Awaitable[Response]]


def _signed_in(*, admin: bool) -> Callable[[Page], Callable[[Dashboard, Request], Awaitable[Response]]]:
    """A page for a signed-in viewer (an admin one for the team pages): others are sent to sign in, or refused."""
    def wrap(page: Page) -> Callable[[Dashboard, Request], Awaitable[Response]]:
        @functools.wraps(page)
        async def handler(self: Dashboard, request: Request) -> Response:
            viewer = await self._viewer_or_refusal(request, admin=admin)
            return viewer if isinstance(viewer, Response) else await page(self, request, viewer)
        return handler
    return wrap


class Dashboard:
    """The dashboard's Starlette app and its connection pool (opened at first use, closed by the gateway)."""

    def __init__(self, config: Config, database_url: str, home: Path):
        self.config = config
        self.database_url = database_url
        self.pool: AsyncConnectionPool | None = None
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        settings = config.dashboard
        self.app = Starlette(
            routes=[
                Route("/", self.home),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/overview", self.overview),
                Route("/quality", self.quality),
                Route("/decisions", self.decisions),
                Route("/limits", self.limits),
                Route("/me", self.customer),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ],
            middleware=[Middleware(
                SessionMiddleware, secret_key=session_secret(home), session_cookie="tm_dashboard",
                max_age=math.ceil(settings.session_hours * 3600), path="/dashboard", same_site="strict",
                https_only=False)],
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            self.pool = AsyncConnectionPool(self.database_url, min_size=1, max_size=4, open=False,
                                            # hours and days are UTC's, whatever the server's zone
                                            kwargs={"autocommit": True, "options": "-c TimeZone=UTC"},
                                            name="tm-dashboard")
            await self.pool.open(wait=True, timeout=10)
        return self.pool

    # ------------------------------------------------------------------ rendering

    def _page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        base = request.scope.get("root_path", "").rstrip("/")
        response = self.templates.TemplateResponse(request, template, {
            "base": base, "ranges": RANGES, **context, "data": _jsonable(context.get("data", {}))},
            status_code=status, headers=_HEADERS)
        return response

    def _days(self, request: Request) -> int:
        try:
            days = int(request.query_params.get("days", "7"))
        except ValueError:
            days = 7
        return days if days in RANGES else 7

    async def _viewer(self, request: Request) -> Viewer | None:
        """Who the session belongs to, read again on each page: a revoked key is signed out at once."""
        kid = request.session.get("kid")
        if not kid:
            return None
        async with (await self._pool()).connection() as conn:
            row = await (await conn.execute("SELECT user_id, admin FROM api_keys WHERE id = %s AND revoked_at IS NULL",
                                            (kid,))).fetchone()
        if row is None:
            request.session.clear()
            return None
        return Viewer(kid, row[0], bool(row[1]))

    async def _viewer_or_refusal(self, request: Request, *, admin: bool) -> Viewer | Response:
        viewer = await self._viewer(request)
        if viewer is None:
            return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/login", status_code=303)
        if admin and not viewer.admin:
            return self._page(request, "refused.html", status=403, viewer=viewer, nav=await self._nav(viewer),
                              message="The team pages need an admin key (tm keys create --admin). "
                                      "Your own usage is under \u201cMy usage\u201d.")
        return viewer

    async def _nav(self, viewer: Viewer) -> list[tuple[str, str]]:
        if not viewer.admin:
            return [("me", "My usage")]
        nav = [("overview", "Team overview"), ("quality", "Quality"), ("decisions", "The loop's decisions")]
        async with (await self._pool()).connection() as conn:
            if await queries.limits_tables(conn):
                nav.append(("limits", "Limits and quotas"))
        return [*nav, ("me", "My usage")]

    # ------------------------------------------------------------------ sign-in

    async def home(self, request: Request) -> Response:
        viewer = await self._viewer(request)
        page = "login" if viewer is None else "overview" if viewer.admin else "me"
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/{page}", status_code=303)

    async def login_form(self, request: Request) -> Response:
        return self._page(request, "login.html")

    async def login(self, request: Request) -> Response:
        """The key comes in a form body, never the URL; the gateway's own login back-off applies to it, and a
        sign-in with a valid key leaves its row in the request log like any request."""
        started = time.perf_counter()
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return self._page(request, "login.html", status=413, error="That form is too large to hold a key.")
        form = parse_qs(body.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        proxy = request.state.proxy
        source = request.client.host if request.client else "unknown"
        wait = proxy.logins.retry_after(source)
        ident = proxy.authenticate(request, {"authorization": f"Bearer {key}"}) if key else None
        if wait > 0:
            if ident is not None:
                proxy.log_bodiless(request, "openai", ident, 429, started=started, error_class="login_backoff",
                                   error_message="too many failed logins from this address")
            return self._page(request, "login.html", status=429,
                              error=f"Too many failed sign-ins from this address: try again in {math.ceil(wait)} s.")
        if ident is None:
            backoff = proxy.logins.failed(source, key or None, request.scope["path"])
            message = "That key is not valid (or has been revoked)."
            if backoff > 0:
                message += f" Too many failures: try again in {math.ceil(backoff)} s."
            return self._page(request, "login.html", status=401, error=message)
        proxy.log_bodiless(request, "openai", ident, 200, started=started, route="dashboard",
                           route_reason="dashboard sign-in")
        request.session.clear()
        request.session["kid"] = ident[0]
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/", status_code=303)

    async def logout(self, request: Request) -> Response:
        request.session.clear()
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/login", status_code=303)

    # ------------------------------------------------------------------ pages

    @_signed_in(admin=True)
    async def overview(self, request: Request, viewer: Viewer) -> Response:
        days = self._days(request)
        async with (await self._pool()).connection() as conn:
            data = await queries.usage(conn, Scope(None), queries.since(days))
        alert_rate = self.config.dashboard.fallback_alert_rate
        alerts = [m for m in data["models"] if m["fallback_rate"] > alert_rate]
        data["fallback_alert_rate"] = alert_rate
        return self._page(request, "overview.html", viewer=viewer, nav=await self._nav(viewer), page="overview",
                          days=days, data=data, totals=data["totals"], models=data["models"], alerts=alerts,
                          alert_rate=alert_rate)

    @_signed_in(admin=True)
    async def quality(self, request: Request, viewer: Viewer) -> Response:
        days = self._days(request)
        async with (await self._pool()).connection() as conn:
            graded = await queries.grades(conn, Scope(None), queries.since(days))
            briefs = await queries.coaching(conn)
            heat = await queries.quality_by_type_model(conn)
        data = {"trend": graded["trend"], "quality_heat": heat}
        return self._page(request, "quality.html", viewer=viewer, nav=await self._nav(viewer), page="quality",
                          days=days, data=data, leaderboard=graded["leaderboard"], briefs=briefs)

    @_signed_in(admin=True)
    async def decisions(self, request: Request, viewer: Viewer) -> Response:
        days = self._days(request)
        async with (await self._pool()).connection() as conn:
            found = await queries.rules(conn, queries.since(days))
        counts: dict[tuple[str, str], int] = {}
        for e in found["history"]:
            day = e["hour"].strftime("%Y-%m-%d")
            counts[(day, e["event"])] = counts.get((day, e["event"]), 0) + 1
        data = {"events": [{"day": d, "event": ev, "n": n} for (d, ev), n in sorted(counts.items())]}
        for r in found["in_force"]:
            r["evidence_json"] = orjson.dumps(r["evidence"], option=orjson.OPT_INDENT_2, default=str).decode()
        return self._page(request, "decisions.html", viewer=viewer, nav=await self._nav(viewer), page="decisions",
                          days=days, data=data, in_force=found["in_force"], history=found["history"][:200],
                          dagster_url=self.config.dashboard.dagster_url.rstrip("/"))

    def _budgets(self, users: tuple[str, ...] = ()) -> list[dict]:
        """Budgets and pools with what each used this period: what `tm budgets list` answers (sync: run in a
        thread); their counters are a few rows, not the log."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return budgets.report(conn, self.config, for_users=users)

    @_signed_in(admin=True)
    async def limits(self, request: Request, viewer: Viewer) -> Response:
        async with (await self._pool()).connection() as conn:
            alerts = await queries.alerts(conn)
            provider_quotas = await queries.provider_quotas(conn)
        spend = await asyncio.to_thread(self._budgets)
        return self._page(request, "limits.html", viewer=viewer, nav=await self._nav(viewer), page="limits",
                          budgets=[b for b in spend if b["scope"] != "pool"],
                          pools=[b for b in spend if b["scope"] == "pool"], quotas=provider_quotas, alerts=alerts)

    @_signed_in(admin=False)
    async def customer(self, request: Request, viewer: Viewer) -> Response:
        """A key holder's own usage, or their team's (`?scope=team`, users.<id>.team in tm.yaml): the users
        are chosen here from the signed session, so no parameter can widen them."""
        days = self._days(request)
        me = self.config.users.get(viewer.user_id)
        team = me.team if me else None
        members = sorted(u for u, c in self.config.users.items() if team and c.team == team) if team else []
        as_team = bool(team) and request.query_params.get("scope") == "team"
        scope = Scope(tuple(members) if as_team else (viewer.user_id,))
        async with (await self._pool()).connection() as conn:
            data = await queries.usage(conn, scope, queries.since(days))
            billed = await queries.billing(conn, scope, queries.since(days))
            grade = await queries.grade_of(conn, viewer.user_id)
        del data["tokens_by"]  # the customer view draws no heat map
        top = data["agents"][0]["agent"] if data["agents"] else None
        spend = await asyncio.to_thread(self._budgets, (viewer.user_id,))
        # Only what applies to this key holder: their own budgets, their key's, their team's and its pool.
        mine = [b for b in spend if (b["scope"], b["subject"]) in
                {("user", viewer.user_id), ("key", viewer.key_id), ("team", team), ("pool", team)}]
        return self._page(request, "customer.html", viewer=viewer, nav=await self._nav(viewer), page="me",
                          days=days, data=data, totals=data["totals"], grade=grade, top_agent=top, team=team,
                          as_team=as_team, agents=data["agents"], models=data["models"], budgets=mine,
                          billed=billed)
