"""The limits stage: requests per minute per key, tokens per turn, turns per hour and turns in flight per
agent, and loop detection; a request refused here reaches no cache, router or provider."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.responses import Response

from tm_gateway.stages.context import JSON, Ctx
from tm_gateway.stages.parse import claude_code_session
from tm_resources import formats as fm
from tm_resources.config import Config, LimitValues

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy

log = logging.getLogger(__name__)

# Characters per token for the estimate of a prompt's size (English prose and code land near 4).
CHARS_PER_TOKEN = 4
_LIMITS = ("requests_per_minute", "tokens_per_turn", "turns_per_hour", "concurrent_turns")
_TAKE = ("SELECT refused, retry_after_s FROM tm_take_limits("
         "%s::text[], %s::int[], %s::int[], %s::text, %s::int, %s::uuid, %s::int)")
_SEEN = "SELECT fp, tool_name, seen, first_seen FROM tm_tool_calls_seen(%s, %s::text[], %s::text[], %s::text[], %s)"
_SWEEP = (
    "DELETE FROM limit_counters WHERE window_start < now() - interval '2 hours';"
    "DELETE FROM limit_leases WHERE expires_at < now();"
    "DELETE FROM tool_call_sightings WHERE seen_at < now() - make_interval(secs => %s);"
)


def effective(config: Config, user: str, agent: str | None) -> LimitValues:
    """The limits a request is held to: the defaults, then its user's overrides, then its agent's."""
    lc = config.limits
    values = {k: getattr(lc, k) for k in _LIMITS}
    for override in (lc.users.get(user), lc.agents.get(agent) if agent else None):
        if override is not None:
            values.update({k: getattr(override, k) for k in override.model_fields_set if k in _LIMITS})
    return LimitValues(**values)


def any_limit(config: Config) -> bool:
    """Whether a limit is set anywhere: the defaults, a user's or an agent's."""
    lc = config.limits
    sets = [lc, *lc.users.values(), *lc.agents.values()]
    return any(getattr(s, k) is not None for s in sets for k in _LIMITS)


def enforced(config: Config) -> bool:
    """Whether anything here needs the database: a limit set anywhere, or loop detection on."""
    return config.limits.loop.repeats > 0 or any_limit(config)


def estimate_tokens(*parts: Any) -> int:
    """A prompt's size in tokens, estimated from its JSON length: no tokenizer on the hot path."""
    n = sum(len(p) if isinstance(p, str) else len(orjson.dumps(p)) for p in parts if p is not None)
    return math.ceil(n / CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    fingerprint: str  # of the name and the arguments, keys sorted: the same call however it is spelt


def _fingerprint(name: str, arguments: Any) -> str:
    if isinstance(arguments, str):
        with contextlib.suppress(orjson.JSONDecodeError):
            arguments = orjson.loads(arguments)
    canonical = orjson.dumps([name, arguments], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def answered_tool_calls(fmt: str, messages: list[dict]) -> list[ToolCall]:
    """The tool calls whose results this request carries: those of the last assistant turn, when a
    tool result follows it (OpenAI `tool` messages; Anthropic `tool_result` blocks)."""
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"), None)
    if last is None:
        return []
    after = messages[last + 1:]
    turn = messages[last]
    calls: list[ToolCall] = []
    if fmt == "openai":
        if not any(m.get("role") == "tool" for m in after):
            return []
        for j, tc in enumerate(turn.get("tool_calls") or ()):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                calls.append(ToolCall(str(tc.get("id") or f"m{last}.{j}"), fn["name"],
                                      _fingerprint(fn["name"], fn.get("arguments"))))
        return calls
    if not any(isinstance(b, dict) and b.get("type") == "tool_result"
               for m in after if isinstance(m.get("content"), list) for b in m["content"]):
        return []
    content = turn.get("content")
    for j, b in enumerate(content if isinstance(content, list) else ()):
        if isinstance(b, dict) and b.get("type") == "tool_use" and isinstance(b.get("name"), str):
            calls.append(ToolCall(str(b.get("id") or f"m{last}.{j}"), b["name"],
                                  _fingerprint(b["name"], b.get("input"))))
    return calls


def session_of(ctx: Ctx, body: dict) -> str:
    """The conversation a request belongs to: x-tm-session, Claude Code's own session, else its key
    and opening message (one conversation of one key, wherever it has got to)."""
    r = ctx.row.data
    sid = r["session_id"] or (claude_code_session(body.get("metadata"), ctx.client_headers)
                              if ctx.fmt == "anthropic" else None)
    if sid:
        return "session:" + sid
    opening = orjson.dumps([r["api_key_id"], body["messages"][0]], option=orjson.OPT_SORT_KEYS)
    return "conversation:" + hashlib.sha256(opening).hexdigest()[:32]


class Limits:
    """The shared side of the limits: counters, leases and tool-call sightings in Postgres, so every
    worker and replica spends from the same windows."""

    def __init__(self, config: Config, pool: AsyncConnectionPool):
        self.config = config
        self.pool = pool
        # False: only loop detection is on (the default), and a request without tool results costs nothing.
        self.limited = any_limit(config)
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    @classmethod
    async def open(cls, config: Config, url: str) -> Limits | None:
        """The limits of this configuration; None when nothing is enforced (then no request pays a query)."""
        if not enforced(config):
            return None
        pool = AsyncConnectionPool(url, min_size=1, max_size=8, open=False, kwargs={"autocommit": True},
                                   timeout=2.0, name="tm-limits")
        await pool.open(wait=False)
        limits = cls(config, pool)
        limits._sweeper = asyncio.create_task(limits._sweep_forever())
        return limits

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()

    async def _sweep_forever(self) -> None:
        # Old windows, dead leases and stale sightings: any worker may sweep, deleting twice is harmless.
        keep_s = max(3600.0, 2 * self.config.limits.loop.window_s)
        while True:
            await asyncio.sleep(60)
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(_SWEEP, (keep_s,))
            except (psycopg.Error, PoolTimeout) as err:
                log.warning("could not sweep old rate-limit windows: %s", err)

    async def take(self, windows: list[tuple[str, int, int]], holder: str | None, lease_limit: int | None,
                   request_id: Any) -> tuple[int, float]:
        """Take one unit from each (name, window seconds, limit) and a lease among `lease_limit`,
        all or nothing: (0, 0) when taken, else (1-based index of the refusing limit, seconds to wait)."""
        names, spans, caps = (list(x) for x in zip(*windows, strict=True)) if windows else ([], [], [])
        async with self.pool.connection() as conn:
            cur = await conn.execute(_TAKE, (names, spans, caps, holder, lease_limit, request_id,
                                             self.config.limits.lease_s))
            row = await cur.fetchone()
        assert row is not None  # the function always returns its one row
        return row[0], row[1]

    def release(self, request_id: Any) -> None:
        """Give back a turn's lease once its answer has ended (a whole answer, a stream, a cut stream)."""
        try:
            task = asyncio.get_running_loop().create_task(self._release(request_id))
        except RuntimeError:  # no loop: the gateway is stopping; the lease expires on its own
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, request_id: Any) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute("DELETE FROM limit_leases WHERE request_id = %s", (request_id,))
        except (psycopg.Error, PoolTimeout) as err:
            log.warning("could not release the turn of request %s (it expires on its own): %s", request_id, err)

    async def seen(self, session: str, calls: list[ToolCall]) -> list[tuple[str, str, int, Any]]:
        """Record the calls and return, per fingerprint, (fingerprint, tool, times seen in the window, first seen)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(_SEEN, (session, [c.call_id for c in calls], [c.fingerprint for c in calls],
                                             [c.name for c in calls], self.config.limits.loop.window_s))
            return await cur.fetchall()


def _refuse(ctx: Ctx, status: int, error_class: str, message: str, retry_after: float | None) -> Response:
    headers = ctx.reply_headers
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    if ctx.fmt == "anthropic":
        body = fm.anthropic_error(status, message)
    else:
        body = fm.openai_error(status, message, code="rate_limit_exceeded" if status == 429 else error_class)
    ctx.row.done(status=status, error_class=error_class, error_message=message)
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _who(agent: str | None, user: str) -> str:
    return f"agent '{agent}'" if agent else f"user '{user}' (no x-tm-agent)"


async def check(gw: Proxy, ctx: Ctx, body: dict) -> Response | None:
    """The refusal to send when a limit is reached (a 429 with retry-after; a loop: a 400 that an SDK
    does not retry), else None with the request's turn counted. Nothing configured: no query at all."""
    limits: Limits | None = gw.limits
    if limits is None:
        return None
    config, r = gw.config, ctx.row.data
    calls: list[ToolCall] | None = None
    if not limits.limited:
        # The default: loop detection alone, which only a request carrying tool results pays for.
        calls = answered_tool_calls(ctx.fmt, body["messages"]) if config.limits.loop.repeats > 0 else []
        if not calls:
            return None
    user, agent, key_id = r["user_id"], r["agent"], r["api_key_id"]
    values = effective(config, user, agent)
    if values.tokens_per_turn is not None:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or config.gateway.default_max_tokens
        est = estimate_tokens(body.get("system"), body["messages"], body.get("tools"))
        if est + max_tokens > values.tokens_per_turn:
            return _refuse(ctx, 429, "rate_limited", (
                f"rate limit: this turn is about {est + max_tokens:,} tokens (about {est:,} input plus max_tokens "
                f"{max_tokens:,}), over the {values.tokens_per_turn:,} a turn of {_who(agent, user)} may use "
                "(limits.tokens_per_turn): shorten the conversation or lower max_tokens; retrying as it is will "
                "not help"), 60)
    try:
        if config.limits.loop.repeats > 0:
            if calls is None:
                calls = answered_tool_calls(ctx.fmt, body["messages"])
            if calls:
                refusal = await _loop(limits, ctx, body, calls)
                if refusal is not None:
                    return refusal
        windows: list[tuple[str, int, int]] = []
        what: list[str] = []
        if values.requests_per_minute is not None:
            windows.append((f"rpm:key:{key_id}", 60, values.requests_per_minute))
            what.append(f"this key may send {values.requests_per_minute:,} requests a minute "
                        "(limits.requests_per_minute)")
        holder = f"agent:{agent}" if agent else f"user:{user}"
        if values.turns_per_hour is not None:
            windows.append((f"tph:{holder}", 3600, values.turns_per_hour))
            what.append(f"{_who(agent, user)} may take {values.turns_per_hour:,} turns an hour (limits.turns_per_hour)")
        leased = values.concurrent_turns is not None
        if not windows and not leased:
            return None
        refused, wait = await limits.take(windows, holder if leased else None, values.concurrent_turns, r["id"])
    except (psycopg.Error, PoolTimeout) as err:
        # Limits guard spend; they must not take the gateway down with the database (the log spools).
        log.warning("rate limits not checked for request %s: the database did not answer (%s)", r["id"], err)
        return None
    if refused == 0:
        if leased:
            ctx.row.after = lambda: limits.release(r["id"])
        return None
    if refused <= len(windows):
        message = f"rate limit: {what[refused - 1]}; retry in {max(1, math.ceil(wait))} s"
    else:
        message = (f"rate limit: {_who(agent, user)} already has {values.concurrent_turns:,} turns in flight, "
                   "as many as it may (limits.concurrent_turns); retry when one has ended")
    return _refuse(ctx, 429, "rate_limited", message, wait)


async def _loop(limits: Limits, ctx: Ctx, body: dict, calls: list[ToolCall]) -> Response | None:
    loop = limits.config.limits.loop
    for _fp, tool, seen, _first in await limits.seen(session_of(ctx, body), calls):
        if seen >= loop.repeats:
            return _refuse(ctx, 400, "loop_detected", (
                f"loop detected: the tool '{tool}' was called {seen} times with the same arguments within "
                f"{loop.window_s:g} s in this session (limits.loop: {loop.repeats} repeats in {loop.window_s:g} s); "
                "the request was not sent to a model: change the approach or the arguments"), None)
    return None
