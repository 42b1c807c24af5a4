"""Keep-warm: re-send an agent's cached Anthropic prompt prefix just before the provider's cache forgets
it, when the agent's pace says the saving beats the ping; one worker per deployment pings (an advisory
lock), every worker reports the prefixes it sent, and each ping is a row (route keep_warm) with its cost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import psycopg
from psycopg.types.json import Jsonb

from tm_gateway.ids import uuid7
from tm_gateway.stages.limits import estimate_tokens
from tm_gateway.stages.log import costs, usage_fields
from tm_resources import formats as fm

if TYPE_CHECKING:
    from tm_gateway.proxy import Proxy

log = logging.getLogger(__name__)

# Anthropic's documented multipliers of the input price, for models whose catalog entry has no cache prices.
WRITE_MULTIPLIER, READ_MULTIPLIER = 1.25, 0.1
_LOCK = 0x746D_7761_726D  # "tmwarm": one pinging worker per database
_UPSERT = (
    "INSERT INTO warm_prefixes (agent, model, prefix_key, user_id, prefix, tokens, first_used, last_used, uses)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (agent, model, prefix_key) DO UPDATE SET"
    " last_used = greatest(warm_prefixes.last_used, excluded.last_used), uses = warm_prefixes.uses + excluded.uses,"
    " user_id = excluded.user_id"
)
# Prefixes still in the provider's cache whose lifetime ends within the lead time.
_DUE = (
    "SELECT agent, model, prefix_key, user_id, prefix, tokens, first_used, uses FROM warm_prefixes"
    " WHERE last_used > now() - make_interval(secs => %(active_s)s)"
    "   AND greatest(last_used, warmed_at) BETWEEN now() - make_interval(secs => %(ttl_s)s)"
    "                                          AND now() - make_interval(secs => %(ttl_s)s - %(lead_s)s)"
)


def worth_warming(uses: int, active_s: float, ttl_s: float, tokens: int, input_price: float,
                  write_price: float | None, read_price: float | None) -> tuple[bool, float, float]:
    """(ping?, expected saving, ping cost) in USD. The agent's turns are taken as a Poisson process at its
    observed pace (the gaps between its uses over the time since the first, so an idle agent's pace
    decays, and a prefix used once is never pinged); a ping pays off when the next turn comes within the
    renewed lifetime, which then reads the prefix instead of writing it again."""
    write = input_price * WRITE_MULTIPLIER if write_price is None else write_price
    read = input_price * READ_MULTIPLIER if read_price is None else read_price
    rate = (uses - 1) / max(active_s, ttl_s)
    p_next = 1 - math.exp(-rate * ttl_s)
    saving = p_next * (write - read) * tokens / 1e6
    cost = read * tokens / 1e6
    return saving > cost, saving, cost


@dataclass(slots=True)
class _Seen:
    user_id: str
    prefix: dict
    tokens: int
    first: datetime
    last: datetime
    uses: int


class KeepWarm:
    """What this worker sent (flushed to `warm_prefixes`), and, on the worker holding the lock, the pings."""

    def __init__(self, gw: Proxy, url: str):
        self.gw = gw
        self.url = url
        self.settings = gw.config.cache.keep_warm
        self.seen: dict[tuple[str, str, str], _Seen] = {}
        self.pings = 0
        self._task: asyncio.Task | None = None
        self._leader: psycopg.AsyncConnection | None = None

    @classmethod
    def start(cls, gw: Proxy, url: str) -> KeepWarm | None:
        cc = gw.config.cache
        if not cc.keep_warm.enabled or cc.prompt_caching == "off":
            return None
        kw = cls(gw, url)
        kw._task = asyncio.create_task(kw._run())
        return kw

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(psycopg.Error):
            await self._flush()
        if self._leader is not None:
            await self._leader.close()

    def saw(self, row: dict, model: str, payload: bytes) -> None:
        """A body sent to an Anthropic-kind model: its system prompt and tools are worth keeping warm
        when a cache breakpoint covers them."""
        body = orjson.loads(payload)
        system, tools = body.get("system"), body.get("tools")
        blocks = (system if isinstance(system, list) else []) + (tools or [])
        if not any(isinstance(b, dict) and "cache_control" in b for b in blocks):
            return
        prefix = {"system": system, "tools": tools}
        pkey = hashlib.sha256(orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        agent = row["agent"] or f"user:{row['user_id']}"
        now = datetime.now(UTC)
        got = self.seen.get((agent, model, pkey))
        if got is None:
            self.seen[(agent, model, pkey)] = _Seen(row["user_id"], prefix, estimate_tokens(system, tools), now, now, 1)
        else:
            got.last, got.uses, got.user_id = now, got.uses + 1, row["user_id"]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self._flush()
                if await self._lead():
                    await self._warm()
            except Exception as err:  # a background task: it must outlive any one bad round
                log.warning("keep-warm skipped a round: %s: %s", type(err).__name__, err)
                if self._leader is not None and self._leader.closed:
                    self._leader = None

    async def _flush(self) -> None:
        seen, self.seen = self.seen, {}
        if not seen:
            return
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn, conn.cursor() as cur:
            await cur.executemany(_UPSERT, [(a, m, k, s.user_id, Jsonb(s.prefix), s.tokens, s.first, s.last, s.uses)
                                            for (a, m, k), s in seen.items()])

    async def _lead(self) -> bool:
        """Whether this worker holds the deployment's keep-warm lock (kept for as long as its connection lives)."""
        if self._leader is None:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK,))
            got = await cur.fetchone()
            if not (got and got[0]):
                await conn.close()
                return False
            self._leader = conn
        return True

    async def _warm(self) -> None:
        s = self.settings
        assert self._leader is not None
        cur = await self._leader.execute(_DUE, {"active_s": s.active_h * 3600, "ttl_s": s.ttl_s, "lead_s": s.lead_s})
        for agent, model, pkey, user_id, prefix, tokens, first_used, uses in await cur.fetchall():
            mcfg = self.gw.config.models.get(model)
            if mcfg is None:
                continue
            price = mcfg.price
            active_s = (datetime.now(UTC) - first_used).total_seconds()
            ping, saving, cost = worth_warming(uses, active_s, s.ttl_s, tokens, price.input, price.cache_write,
                                               price.cache_read)
            if not ping:
                continue
            await self._ping(agent, model, user_id, prefix, saving, cost)
            await self._leader.execute(
                "UPDATE warm_prefixes SET warmed_at = now() WHERE agent = %s AND model = %s AND prefix_key = %s",
                (agent, model, pkey))

    async def _ping(self, agent: str, model: str, user_id: str, prefix: dict, saving: float, cost: float) -> None:
        """The smallest request that reads the prefix (and so renews its lifetime), logged and priced."""
        gw, config = self.gw, self.gw.config
        mcfg = config.models[model]
        ep = gw.endpoints[mcfg.provider]
        body = {"model": mcfg.upstream or model, "max_tokens": 1,
                "messages": [{"role": "user", "content": "ok"}],
                **{k: v for k, v in prefix.items() if v is not None}}
        started = time.perf_counter()
        row: dict[str, Any] = {
            "id": uuid7(), "ts": datetime.now(UTC), "user_id": user_id, "api_key_id": None, "api_format": "anthropic",
            "endpoint": "keep_warm", "route": "keep_warm", "agent": None if agent.startswith("user:") else agent,
            "model": model, "requested_model": model, "provider": ep.name, "upstream_model": mcfg.upstream or model,
            "route_reason": f"kept the prompt cache warm: expected saving ${saving:.6f} > ping ${cost:.6f}",
        }
        try:
            async with gw.session.post(ep.url, data=orjson.dumps(body), headers=ep.headers(0),
                                       timeout=gw.timeouts[ep.name]) as resp:
                data = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as err:
            status, data = 502, orjson.dumps({"error": {"message": type(err).__name__}})
        answer: Any = None
        with contextlib.suppress(ValueError):
            answer = orjson.loads(data)
        if status == 200 and isinstance(answer, dict):
            usage = fm.usage_from_anthropic(answer.get("usage"))
            cost_usd, baseline = costs(config, model, usage)
            row.update(status=200, cost_usd=cost_usd, baseline_cost_usd=baseline, **usage_fields(usage))
            self.pings += 1
        else:
            row.update(status=502 if status == 200 else status, error_class="keep_warm_failed",
                       error_message=gw.scrub(fm.error_message_from_body(data)))
        row["latency_ms"] = (time.perf_counter() - started) * 1000
        gw.request_log.write(row)

