"""The guard stage: a request's maximum cost reserved against every budget that applies (atomically, in
Postgres) before any model is called, settled to the real cost once its row is written, and billed
against its team's token pool; a spent budget sends `auto` to a free local model and refuses paid ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.responses import Response

from tm_gateway import budgets as bg
from tm_gateway import fallback
from tm_gateway.rules import Route, machine_chooses
from tm_gateway.stages.context import JSON, Ctx
from tm_resources import alerts
from tm_resources import formats as fm
from tm_resources.config import Config, Tier
from tm_resources.db import connect
from tm_resources.events import EventSink

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy
    from tm_gateway.state import SharedState

log = logging.getLogger(__name__)

_RESERVE = "SELECT refused, used FROM tm_budget_reserve(%s, %s, %s, %s, %s, %s)"
_SETTLE = "SELECT tm_budget_settle(%s, %s, %s, %s, %s)"
_RELEASE_EXPIRED = "SELECT tm_budget_release_expired()"
# How often a replica that reserves gives back the holds of gateways that died before settling.
RELEASE_EVERY_S = 30.0
_INF = float("inf")


class Spend:
    """What the guard keeps across requests: the limits in force (re-read with the keys and rules), a
    few connections for reservations (opened on the first request a limit applies to), the settlements
    under way, and the alerts this replica has already seen recorded."""

    def __init__(self, config: Config, shared: SharedState, events: EventSink):
        self.config = config
        self.book = bg.BudgetBook(config)
        self.url = shared.url
        self.events = events
        self._pool: AsyncConnectionPool | None = None
        self._opened: asyncio.Future | None = None
        self._releaser: asyncio.Task | None = None
        self._settling: set[asyncio.Task] = set()
        self._alerted: set[tuple[str, str, datetime]] = set()
        with connect(self.url) as conn:
            self.book.replace(bg.stored_map(conn.execute(bg.STORED_SQL)),
                              dict(conn.execute(bg.KEY_TEAMS_SQL).fetchall()))
        shared.watch(("budgets", "api_keys"), self._reload)

    async def _reload(self, conn: psycopg.AsyncConnection) -> None:
        stored = bg.stored_map(await (await conn.execute(bg.STORED_SQL)).fetchall())
        teams: dict[str, str] = dict(await (await conn.execute(bg.KEY_TEAMS_SQL)).fetchall())
        self.book.replace(stored, teams)

    async def pool(self) -> AsyncConnectionPool:
        if self._opened is None:
            # Every request that arrives while the pool opens waits for that one opening.
            self._pool = AsyncConnectionPool(self.url, min_size=1, max_size=8, open=False, configure=_no_flush_wait,
                                             kwargs={"autocommit": True}, name="tm-budgets")
            self._opened = asyncio.ensure_future(self._pool.open())
            self._releaser = asyncio.get_running_loop().create_task(self._release_expired(self._pool),
                                                                    name="tm-budget-holds")
        await self._opened
        assert self._pool is not None
        return self._pool

    async def _release_expired(self, pool: AsyncConnectionPool) -> None:
        while True:
            await asyncio.sleep(RELEASE_EVERY_S)
            try:
                async with pool.connection() as conn:
                    n = 0
                    while (await _one(await conn.execute(_RELEASE_EXPIRED)))[0]:
                        n += 1
                if n:
                    log.warning("gave back %d expired budget reservation(s) of requests that never settled", n)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - tried again next time
                log.warning("releasing expired budget reservations failed (%s)", type(err).__name__)

    def settle_later(self, tally: Tally) -> None:
        self._later(self._settle(tally))

    def spent_later(self, lim: bg.Limit, start: datetime, used: float) -> None:
        """A request found `lim` without room: that is the budget spent, whatever the counter says."""
        self._later(self._spent(lim, start, max(used, lim.amount)))

    def _later(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _spent(self, lim: bg.Limit, start: datetime, used: float) -> None:
        try:
            async with (await self.pool()).connection() as conn:
                await self._alerts(conn, [(lim, start, used)], spent=True)
        except Exception as err:  # noqa: BLE001 - the refusal is sent; only its alert is lost
            log.warning("budget alert for %s failed (%s)", lim.subject, type(err).__name__)

    async def drain(self) -> None:
        """Wait for the settlements under way (a stopping gateway, a test that reads the counters)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self._releaser is not None:
            self._releaser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._releaser
        if self._pool is not None:
            await self._pool.close()

    async def _settle(self, tally: Tally) -> None:
        limits = tally.limits
        actual = [tally.std if lim.scope == "pool" else tally.cost for lim in limits]
        costs = [tally.cost] * len(limits)
        try:
            async with (await self.pool()).connection() as conn:
                cur = await conn.execute(_SETTLE, (tally.rid, [lim.subject for lim in limits], tally.starts, actual,
                                                   costs))
                (after,) = await _one(cur)
                await self._alerts(conn, list(zip(limits, tally.starts, after, strict=True)))
        except Exception as err:  # noqa: BLE001 - the answer is sent; what is lost is logged
            log.warning("budget settlement of request %s failed (%s): its reservation of $%.6f stays counted"
                        " until it expires (budgets.reservation_ttl_s)",
                        tally.rid, type(err).__name__, tally.reserved)

    async def _alerts(self, conn: psycopg.AsyncConnection, counters: list[tuple[bg.Limit, datetime, float]],
                      spent: bool = False) -> None:
        """An alert for each threshold a counter has reached, once per period (the alerts table decides
        across replicas; this replica remembers what it has seen recorded)."""
        for lim, start, used in counters:
            if lim.amount <= 0:
                continue
            for level in self.config.budgets.alert_at:
                if used < level * lim.amount - 1e-12:
                    break
                seen = (lim.subject, f"{level:g}", start)
                if seen in self._alerted:
                    continue
                self._alerted.add(seen)
                message, data = await self._notice(conn, lim, start, used, level, spent)
                await alerts.record_async(conn, kind="pool" if lim.scope == "pool" else "budget",
                                          subject=lim.subject, level=f"{level:g}", period_start=start,
                                          message=message, data=data, sink=self.events)

    async def _notice(self, conn: psycopg.AsyncConnection, lim: bg.Limit, start: datetime, used: float,
                      level: float, spent: bool) -> tuple[str, dict[str, Any]]:
        now = datetime.now(UTC)
        _, reset = bg.period_bounds(lim.period, now, self.book.zone)
        data: dict[str, Any] = {"scope": lim.scope, "name": lim.name, "period": lim.period, "limit": lim.amount,
                                "used": used, "fraction": round(used / lim.amount, 4), "resets_at": reset.isoformat()}
        if lim.scope != "pool" and spent and level >= 1:
            return (f"{lim.describe()} is spent: requests for paid models are refused (auto and presets go to a"
                    f" free local model) until it resets at {reset:%Y-%m-%d %H:%M %Z}", data)
        if lim.scope != "pool":
            return (f"{lim.describe()} is {used / lim.amount:.0%} used (${used:,.2f}, requests in flight included);"
                    f" it resets at {reset:%Y-%m-%d %H:%M %Z}", data)
        words = f"{lim.describe()} is {used / lim.amount:.0%} used ({used:,.0f} standard tokens)"
        if level < 1:
            return words, data
        cur = await conn.execute("SELECT cost_usd FROM budget_usage WHERE subject = %s AND period_start = %s",
                                 (lim.subject, start))
        row = await cur.fetchone()
        cost = row[0] if row else 0.0
        elapsed = max((now - start).total_seconds() / (reset - start).total_seconds(), 1e-6)
        over_tokens = max(0.0, used / elapsed - lim.amount)
        per_token = cost / used if used else 0.0
        estimate = over_tokens * per_token * (1 + bg.markup(self.config.budgets.billing.markup, per_token * 1e6))
        data["estimated_overage_usd"] = round(estimate, 6)
        return (f"Team {lim.name} has used all the included tokens of its monthly pool ({lim.amount:,.0f}"
                f" standard tokens; {used:,.0f} used). Requests continue, billed at overage rates (cost plus the"
                f" markup of each model's price band) until the pool renews at {reset:%Y-%m-%d %H:%M %Z}. At the"
                f" current rate this month's overage comes to about ${estimate:,.2f}.", data)


async def _one(cur: psycopg.AsyncCursor) -> tuple:
    """The row of a query that always returns one (these functions' results)."""
    row = await cur.fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return row


async def _no_flush_wait(conn: psycopg.AsyncConnection) -> None:
    # Every reservation and settlement is a commit: waiting for its WAL flush cost 7 ms a request
    # here (docs/benchmarks.md). Without the wait a commit is still atomic and isolated, so the limit
    # holds across replicas; only a crash of Postgres itself may forget the last fraction of a second
    # of counter moves.
    await conn.execute("SET synchronous_commit = off")


class Tally:
    """One request's reservation: what it reserved on which counters, and what its rows cost; the
    request's own row settles it (a cascade's refused first answer only adds its cost)."""

    __slots__ = ("spend", "config", "rid", "team", "limits", "starts", "reserved", "pool", "pool_used", "cost", "std")

    def __init__(self, spend: Spend, config: Config, rid: Any, team: str | None):
        self.spend = spend
        # The proxy's, which serves the deployed fine-tunes too.
        self.config = config
        self.rid = rid
        self.team = team
        self.limits: tuple[bg.Limit, ...] = ()
        self.starts: list[datetime] = []
        self.reserved = 0.0
        self.pool: float | None = None
        self.pool_used = 0.0
        self.cost = 0.0
        self.std = 0.0

    def row_done(self, data: dict) -> None:
        """Called as a row is written: its bill, and (the request's own row) the settlement."""
        config = self.config
        data["team"] = self.team
        model, cost = data.get("model"), data.get("cost_usd") or 0.0
        if model in config.models:
            usage = fm.Usage(data.get("input_tokens", 0), data.get("output_tokens", 0),
                             data.get("cache_read_tokens", 0), data.get("cache_write_tokens", 0))
            b = bg.bill(config, model, cost, usage, pool=self.pool, pool_used=self.pool_used)
            data["billing"], data["billed_usd"] = b.billing, b.billed_usd
            self.std += b.standard_tokens
            self.pool_used += b.standard_tokens
        self.cost += cost
        if data["id"] == self.rid and self.limits:
            self.spend.settle_later(self)


async def guard(gw: Proxy, ctx: Ctx, body: dict, chosen: Route) -> Route | Response:
    """Reserve what the request may cost on every budget that applies, or find it no room: then `auto`
    and presets go to a free model and a paid model named by the caller gets a 429."""
    spend: Spend = gw.budgets
    row = ctx.row
    r = row.data
    tally = Tally(spend, gw.config, r["id"], spend.book.team_of(r["api_key_id"], r["user_id"]))
    row.tally = tally
    if not spend.book.active:
        return chosen  # nothing configured anywhere: no query, only the row's bill
    limits = spend.book.limits_for(r["user_id"], tally.team, r["api_key_id"])
    if not limits:
        return chosen
    config = gw.config
    first = fallback.chain(chosen.model, config)
    for m in chosen.chain:
        first += [c for c in fallback.chain(m, config) if c not in first]
    # A cascade may pay for each cheap model (a consensus calls several) and then the escalation.
    cascaded = [fallback.chain(m, config) for m in (*chosen.consensus, chosen.escalate_to)
                if m] if chosen.escalate_to else []
    if all(bg.free(config, m) for m in (*first, *(m for c in cascaded for m in c))):
        return chosen  # a free model is never blocked, and draws from no pool
    cap = next((v for v in (body.get("max_completion_tokens"), body.get("max_tokens"))
                if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
    if cap is None:
        # Bound what the answer may cost, as the reservation assumes.
        cap = body["max_tokens"] = config.gateway.default_max_tokens
    # Each of OpenAI's `n` choices may run to the cap.
    out_tokens = cap * max(1, body.get("n") or 1)
    tools = orjson.dumps(body["tools"]).decode() if body.get("tools") else None
    system = r.get("system") if isinstance(r.get("system"), str) else None
    input_tokens = bg.estimate_input_tokens(r.get("messages"), system, tools)
    amount = bg.max_cost(config, first, input_tokens, out_tokens) \
        + sum(bg.max_cost(config, c, input_tokens, out_tokens) for c in cascaded)
    now = datetime.now(UTC)
    ordered = sorted(limits, key=lambda lim: lim.subject)
    starts = [bg.period_bounds(lim.period, now, spend.book.zone)[0] for lim in ordered]
    try:
        async with (await spend.pool()).connection() as conn:
            cur = await conn.execute(_RESERVE, (r["id"], [lim.subject for lim in ordered], starts,
                                                [0.0 if lim.scope == "pool" else amount for lim in ordered],
                                                [_INF if lim.scope == "pool" else lim.amount for lim in ordered],
                                                config.budgets.reservation_ttl_s))
            refused, used = await _one(cur)
    except Exception as err:  # noqa: BLE001 - a limit that cannot be checked is not passed
        log.warning("budget reservation failed (%s)", type(err).__name__)
        return _refuse(ctx, 503, "budget_unavailable",
                       "the gateway cannot check your budget right now (its database is unreachable);"
                       " try again shortly")
    if refused:
        lim = ordered[refused - 1]
        return _spent(gw, ctx, chosen, lim, used[0], now)
    tally.limits, tally.starts, tally.reserved = tuple(ordered), starts, amount
    fractions = []
    for lim, u in zip(ordered, used, strict=True):
        if lim.scope == "pool":
            tally.pool, tally.pool_used = lim.amount, u
            fractions.append(u / lim.amount if lim.amount else 1.0)
        elif lim.amount:
            fractions.append((u - amount) / lim.amount)
    _report_used(ctx, config, max(fractions, default=0.0))
    return chosen


def _report_used(ctx: Ctx, config: Config, fraction: float) -> None:
    alert_at = config.budgets.alert_at
    if alert_at and fraction >= alert_at[0]:
        ctx.reply_headers["x-tm-budget-used"] = f"{fraction:.2f}"


def _spent(gw: Proxy, ctx: Ctx, chosen: Route, lim: bg.Limit, used: float, now: datetime) -> Route | Response:
    """No room on `lim`: a free model for a request that lets the machine choose, else a 429."""
    config, r = gw.config, ctx.row.data
    start, reset = bg.period_bounds(lim.period, now, gw.budgets.book.zone)
    said = f"{lim.describe()} is spent (${used:,.2f} used, requests in flight included); it resets at " \
           f"{reset:%Y-%m-%d %H:%M %Z}"
    _report_used(ctx, config, max(used / lim.amount, 1.0) if lim.amount else 1.0)
    gw.budgets.spent_later(lim, start, used)
    requested = r.get("requested_model") or chosen.model
    if machine_chooses(requested, config):
        local = _free_model(config, chosen)
        if local is not None:
            route = Route(local, "budget:local", f"{said}: answered by the free local model {local}")
            r["route"], r["route_reason"] = route.route, route.reason
            ctx.reply_headers["x-tm-route"] = route.route
            return route
    return _refuse(ctx, 429, "budget_exceeded",
                   f"{said}. '{chosen.model}' is a paid model: ask for 'auto' or a local model meanwhile, or ask"
                   " an admin to raise the budget (tm budgets set).")


def _free_model(config: Config, chosen: Route) -> str | None:
    """The first free model of the route's chain, else the default model if free, else any free local model."""
    for m in (chosen.model, *chosen.chain, config.defaults.model):
        if bg.free(config, m):
            return m
    return next((m for m in config.models if bg.free(config, m) and config.models[m].tier is Tier.local), None)


def _refuse(ctx: Ctx, status: int, error_class: str, message: str) -> Response:
    ctx.row.done(status=status, error_class=error_class, error_message=message)
    if ctx.fmt == "anthropic":
        body = fm.anthropic_error(status, message, type="rate_limit_error" if status == 429 else "api_error")
    else:
        kind = "insufficient_quota" if status == 429 else "server_error"
        body = fm.openai_error(status, message, type=kind, code=kind)
    # A spent budget does not come back in seconds: the SDKs must not retry it.
    headers = {**ctx.reply_headers, "x-should-retry": "false"}
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)
