"""The response cache: exact (the same request again) and semantic (a prompt close to one whose answer
scored well), both in Postgres.

Exact hits come straight from `requests`, by the sha256 of everything that shapes the answer (the
model asked for, system, messages, tools, sampling parameters): a repeat is served as soon as the
first answer is logged, unless the loop has since scored that answer under
`loop.thresholds.cache_min_quality`. Semantic hits come from `cache_entries`, which the loop fills
with the answers that scored at least that bar (asset `cache_entries`, rebuilt from `requests` and
`scored_requests` like every derived table), searched by HNSW on the prompt vector. A semantic hit
also needs the same *context*: the same model asked for, system prompt, earlier turns and tools;
only the last user turn may differ, and only when it is plain text.

Only answers that ended normally (no tool call, not cut off) are served. Who shares answers is
`cache.scope`: each user their own, a team (`users.<id>.team`), or everyone.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import orjson
import psycopg
from rbloom import Bloom

from tm_resources.config import Config
from tm_resources.db import one
from tm_resources.embedder import fits_window
from tm_resources.prompts import split_person_text

# Finish reasons of a whole answer (OpenAI, Anthropic): nothing cut off, no tool call pending.
SERVABLE_FINISH = ("stop", "end_turn", "stop_sequence")
# Request fields that do not change the answer (or are the gateway's own business).
_NOT_KEY = frozenset(("stream", "stream_options", "user", "metadata", "service_tier", "store"))
# Fields that shape an answer's content besides the messages: kept in the semantic context.
_CONTEXT_PARAMS = ("tools", "tool_choice", "response_format", "functions", "function_call")
# How long ago entries are kept in cache_entries; lookups read the last cache.semantic.window_h.
KEEP_ENTRIES = timedelta(days=7)


@dataclass(frozen=True)
class CacheKeys:
    request_hash: str
    # None: the request cannot be matched semantically (the last turn is not plain user text).
    context_hash: str | None


@dataclass(frozen=True)
class Hit:
    kind: str                    # "exact" | "semantic"
    source_id: Any               # the request whose answer is served
    source_ts: datetime
    model: str | None
    text: str
    baseline_cost_usd: float | None
    similarity: float | None


def scope_key(user_id: str, config: Config) -> str:
    """Who shares cached answers with `user_id`, as one name (see scope_users): the pre-filters
    below hold their keys per scope, so whether Postgres is asked (and so how long a request
    takes) depends only on what this user's scope has sent, never on another user's prompts."""
    scope = config.cache.scope
    if scope == "global":
        return ""
    if scope == "team":
        me = config.users.get(user_id)
        if me is not None and me.team:
            return "t:" + me.team
    return "u:" + user_id


class RecentHashes:
    """The request hashes answered in the last `ttl_s` seconds, by any replica, held in memory so that
    an exact lookup goes to Postgres only for a request that may have been answered before in the
    asker's cache scope (`scope_of`: user id -> scope_key; None: one scope for all): a miss, most
    requests, costs a filter test instead of a query. Read whole at start (`load`), then by time
    (`refresh`, each state poll, `overlap_s` back for rows logged late); this replica adds its own as
    it looks them up (`add`).

    The hashes sit in Bloom filters (rbloom) sized for `capacity` distinct hashes at a 1 % false
    positive rate, so memory is fixed whatever the traffic (2 x 6 MB for the default 5 million): a
    false positive, or every test once more hashes than `capacity` crowd one, costs one exact query,
    never a wrong answer. Two generations: every `ttl_s / 2` a whole re-read fills a new filter and the
    old one is kept beside it until the next, so expired hashes go while this replica's own recent
    ones (whose rows may not be logged yet: a long answer is logged when it ends) stay. A hash held
    here may still miss in Postgres (expired, scored under the bar, failed): it only decides whether
    to ask."""

    overlap_s = 30.0

    def __init__(self, ttl_s: float, scope_of: Callable[[str], str] | None = None, capacity: int = 5_000_000):
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.scope_of = scope_of or (lambda _user: "")
        self._seen = Bloom(capacity, 0.01)
        self._previous: Bloom | None = None
        self._newest: datetime | None = None
        self._loaded_at: datetime | None = None

    def _key(self, request_hash: str, user_id: str) -> int:
        return hash((self.scope_of(user_id), request_hash[:16]))

    def __len__(self) -> int:
        """About how many distinct hashes the newer filter holds (rbloom's estimate from its set bits)."""
        return round(self._seen.approx_items)

    @property
    def memory_bytes(self) -> int:
        return sum(b.size_in_bits // 8 for b in (self._seen, self._previous) if b is not None)

    def _has(self, key: int) -> bool:
        return key in self._seen or (self._previous is not None and key in self._previous)

    def may_have(self, request_hash: str, user_id: str) -> bool:
        return self._loaded_at is None or self._has(self._key(request_hash, user_id))

    def add(self, request_hash: str, user_id: str) -> bool:
        """Hold a request's hash; returns what `may_have` said before (the digest computed once)."""
        key = self._key(request_hash, user_id)
        had = self._loaded_at is None or self._has(key)
        self._seen.add(key)
        return had

    # One row of arrays rather than a row per request: a poll re-reads overlap_s seconds of traffic
    # (60,000 rows a second at 2,000 requests/s), and a Python tuple and datetime per row cost the event
    # loop about 3 times the CPU of two arrays the driver decodes in C.
    _SQL = ("SELECT max(ts), array_agg(left(request_hash, 16)), array_agg(user_id) FROM requests"
            " WHERE ts > %(since)s AND request_hash IS NOT NULL AND status = 200 AND cache_hit IS NULL")

    def _keys(self, hashes: list[str] | None, users: list[str] | None) -> list[int]:
        if not hashes or not users:
            return []
        scopes = {u: self.scope_of(u) for u in set(users)}
        return [hash((scopes[u], h)) for h, u in zip(hashes, users, strict=True)]

    def _filled(self, got: tuple) -> Bloom:
        seen = Bloom(self.capacity, 0.01)
        seen.update(self._keys(got[1], got[2]))
        return seen

    def _note_newest(self, newest: datetime | None) -> None:
        if newest is not None and (self._newest is None or newest > self._newest):
            self._newest = newest

    def load(self, conn: psycopg.Connection) -> None:
        now = one(conn.execute("SELECT now()"))[0]
        got = one(conn.execute(self._SQL, {"since": now - timedelta(seconds=self.ttl_s)}))
        self._previous, self._seen, self._loaded_at = None, self._filled(got), now
        self._note_newest(got[0])

    async def refresh(self, conn: psycopg.AsyncConnection) -> None:
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
        assert row is not None  # now() is one row
        now = row[0]
        whole = self._loaded_at is None or now - self._loaded_at > timedelta(seconds=self.ttl_s / 2)
        since = now - timedelta(seconds=self.ttl_s) if whole or self._newest is None else \
            self._newest - timedelta(seconds=self.overlap_s)
        cur = await conn.execute(self._SQL, {"since": since})
        got = await cur.fetchone()
        assert got is not None  # an aggregate is one row
        if whole:
            # Off the event loop: a day of busy traffic is millions of rows. Hashes added meanwhile go
            # to the filter that becomes the previous one, still consulted.
            seen = await asyncio.to_thread(self._filled, got)
            self._previous, self._seen, self._loaded_at = self._seen, seen, now
        else:
            self._seen.update(self._keys(got[1], got[2]))
        self._note_newest(got[0])


class CacheContexts:
    """Which (context, model asked for) pairs have semantic cache entries in the last `window_h`
    hours, per cache scope (`scope_of`, as RecentHashes), held in memory so that a request in any
    other context (most turns of a conversation, a new system prompt) costs no semantic lookup.
    Read at start and whenever the loop rewrites `cache_entries` (its version moves); a pair held
    here may still miss (too far apart): it only decides whether to ask."""

    def __init__(self, window_h: int, scope_of: Callable[[str], str] | None = None):
        self.window_h = window_h
        self.scope_of = scope_of or (lambda _user: "")
        self._pairs: set[tuple[str, int, str]] | None = None

    def __len__(self) -> int:
        return len(self._pairs or ())

    def may_have(self, context_hash: str, requested_model: str, user_id: str) -> bool:
        return self._pairs is None or \
            (self.scope_of(user_id), int(context_hash[:16], 16), requested_model) in self._pairs

    def load(self, conn: psycopg.Connection) -> None:
        rows = conn.execute("SELECT DISTINCT context_hash, requested_model, user_id FROM cache_entries"
                            " WHERE ts > now() - make_interval(hours => %s)", (self.window_h,)).fetchall()
        self._pairs = {(self.scope_of(u), int(c[:16], 16), m) for c, m, u in rows}


def _digest(obj: Any) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _plain_text(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content)


def keys(body: dict, agent: str | None = None) -> CacheKeys:
    """The request's cache keys. `body` is a validated request in either format; the agent it was
    sent as (x-tm-agent) is part of both keys, since an agent answers with its own settings."""
    request_hash = _digest({"agent": agent, **{k: v for k, v in body.items() if k not in _NOT_KEY}})
    msgs = body["messages"]
    last = msgs[-1]
    if not (isinstance(last, dict) and last.get("role") == "user" and _plain_text(last.get("content"))):
        return CacheKeys(request_hash, None)
    context = {"agent": agent, "model": body["model"], "system": body.get("system"), "history": msgs[:-1],
               **{k: body[k] for k in _CONTEXT_PARAMS if k in body}}
    # The prompt is matched on the person's words only (tm_resources/prompts.py): what their client
    # added to the turn (file contents, a date) is context, and must be the same for a hit.
    added = split_person_text(_text(last["content"]))[1]
    if added:
        context["client_added"] = added
    return CacheKeys(request_hash, _digest(context))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if isinstance(p.get("text"), str))


def scope_users(user_id: str, config: Config) -> list[str] | None:
    """The users whose answers `user_id` may be served; None: everyone's."""
    scope = config.cache.scope
    if scope == "global":
        return None
    if scope == "team":
        me = config.users.get(user_id)
        if me is not None and me.team:
            return sorted({user_id, *(u for u, c in config.users.items() if c.team == me.team)})
    return [user_id]


_SCOPE = " AND r.user_id = ANY(%(users)s)"

_EXACT = """
SELECT r.id, r.ts, r.model, r.response_text, r.baseline_cost_usd
FROM requests r
WHERE r.request_hash = %(hash)s AND r.ts > now() - make_interval(secs => %(ttl)s)
  AND r.status = 200 AND r.cache_hit IS NULL AND r.finish_reason = ANY(%(finish)s)
  AND r.response_text IS NOT NULL AND r.response_text <> ''{scope}
  AND NOT EXISTS (SELECT 1 FROM scored_requests s WHERE s.request_id = r.id AND s.quality < %(min_quality)s)
ORDER BY r.ts DESC
LIMIT 1
"""

# The nearest entry first, then its answer. With the HNSW index, an iterative scan so the filters do
# not starve it; without (see db.hnsw_supported), an exact scan of the entries with this context.
_SEMANTIC = """
WITH nearest AS (
    SELECT r.request_id, r.ts, r.prompt_embedding <=> %(vec)s::halfvec(384) AS distance
    FROM cache_entries r
    WHERE r.requested_model = %(model)s AND r.context_hash = %(context)s
      AND r.ts > now() - make_interval(hours => %(hours)s){scope}
    ORDER BY r.prompt_embedding <=> %(vec)s::halfvec(384)
    LIMIT 1
)
SELECT q.id, q.ts, q.model, q.response_text, q.baseline_cost_usd, 1 - n.distance
FROM nearest n JOIN requests q ON q.id = n.request_id AND q.ts = n.ts
WHERE 1 - n.distance >= %(threshold)s
"""


def _sql(template: str, users: list[str] | None) -> str:
    return template.format(scope=_SCOPE if users is not None else "")


async def lookup_exact(conn: psycopg.AsyncConnection, keys_: CacheKeys, users: list[str] | None,
                       config: Config) -> Hit | None:
    params = {"hash": keys_.request_hash, "ttl": config.cache.exact_ttl_s, "finish": list(SERVABLE_FINISH),
              "users": users, "min_quality": config.loop.thresholds.cache_min_quality}
    cur = await conn.execute(_sql(_EXACT, users), params)
    row = await cur.fetchone()
    if row is None:
        return None
    return Hit("exact", row[0], row[1], row[2], row[3], row[4], None)


async def lookup_semantic(conn: psycopg.AsyncConnection, requested_model: str, keys_: CacheKeys,
                          vec: np.ndarray, users: list[str] | None, config: Config) -> Hit | None:
    if keys_.context_hash is None:
        return None
    sem = config.cache.semantic
    params = {"vec": np.asarray(vec, dtype=np.float32), "model": requested_model, "context": keys_.context_hash,
              "hours": sem.window_h, "users": users, "threshold": sem.threshold}
    cur = await conn.execute(_sql(_SEMANTIC, users), params)
    row = await cur.fetchone()
    if row is None:
        return None
    return Hit("semantic", row[0], row[1], row[2], row[3], row[4], float(row[5]))


async def configure_connection(conn: psycopg.AsyncConnection, ef_search: int = 100,
                               statement_timeout_s: float | None = None) -> None:
    """For each pooled connection: vectors as numpy arrays; HNSW scans that keep going until the
    filters (model, context, window, scope) let a row through instead of returning nothing, with
    `ef_search` candidates (cache.semantic.hnsw_ef_search); and a lookup the gateway has given up
    (cache.lookup_timeout_s) ended by the server, its connection free again."""
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)
    await conn.execute("SET hnsw.iterative_scan = relaxed_order")
    await conn.execute(f"SET hnsw.ef_search = {int(ef_search)}")
    if statement_timeout_s is not None:
        await conn.execute(f"SET statement_timeout = {max(1, int(statement_timeout_s * 1000))}")


# -- the loop's side: which answers the semantic cache may serve --------------------------------


def replace_entries(conn: psycopg.Connection, hour: datetime, config: Config) -> int:
    """Rewrite `hour`'s cache entries: its answered requests that scored at least
    loop.thresholds.cache_min_quality, ended normally, were not themselves cache hits, and whose
    prompt its vector covers whole (embedder.fits_window: a longer prompt is embedded from its
    opening only, and would be served to every prompt that opens the same way). Entries older than
    a week are dropped (lookups read the last cache.semantic.window_h hours)."""
    end = hour + timedelta(hours=1)
    params = {"hour": hour, "end": end, "finish": list(SERVABLE_FINISH),
              "min_quality": config.loop.thresholds.cache_min_quality}
    servable = """
        FROM requests r JOIN scored_requests s ON s.request_id = r.id
        WHERE r.ts >= %(hour)s AND r.ts < %(end)s AND r.status = 200 AND r.cache_hit IS NULL
          AND r.context_hash IS NOT NULL AND r.requested_model IS NOT NULL
          AND r.finish_reason = ANY(%(finish)s) AND s.quality >= %(min_quality)s
          AND coalesce(r.prompt_embedding, s.prompt_embedding) IS NOT NULL"""
    candidates = conn.execute("SELECT r.id, r.prompt" + servable, params).fetchall()
    whole = fits_window([prompt or "" for _, prompt in candidates])
    params["ids"] = [rid for (rid, _), ok in zip(candidates, whole, strict=True) if ok]
    with conn.transaction():
        conn.execute("DELETE FROM cache_entries WHERE hour = %s OR ts < %s", (hour, hour - KEEP_ENTRIES))
        cur = conn.execute(
            """
            INSERT INTO cache_entries (hour, request_id, ts, user_id, requested_model, context_hash, model,
                                       quality, prompt_embedding)
            SELECT %(hour)s, r.id, r.ts, r.user_id, r.requested_model, r.context_hash, r.model, s.quality,
                   coalesce(r.prompt_embedding, s.prompt_embedding)::halfvec(384)"""
            + servable + """
              AND r.id = ANY(%(ids)s)
            ON CONFLICT (request_id) DO NOTHING
            """,
            params,
        )
        return cur.rowcount
