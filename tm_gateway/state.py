"""What a replica holds in memory from Postgres (API keys, routing rules, the model registry, and
optionally the learned router and the exact cache's recent request hashes), re-read only when its
version moves (the hashes: by time, each poll)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import psycopg

from tm_gateway.keys import ACTIVE_KEYS_SQL, active_keys, key_map
from tm_gateway.learned import LearnedRouter, RouterSettings, load_with
from tm_gateway.rules import RuleBook, load_rulebook
from tm_resources.cache import CacheContexts, RecentHashes
from tm_resources.db import connect
from tm_resources.registry import RegisteredModel, load_registry

log = logging.getLogger(__name__)


class SharedState:
    """sha256(key) -> (key id, user id), and the rule book; each re-read when `tm_state_versions` says
    its table changed, so a request never waits on a query.

    learn_router: also hold `learned`, the router fitted to the scored request log
    (tm_gateway/learned.py), loaded in the background after `start()` and again whenever the loop
    writes new routing rules (each hour). It may choose among `router_models` (the configured
    models; None: any model in the log) and the deployed fine-tunes. A failed load keeps the router
    held and is retried after `learn_retry_s`. `learned` is None until the first load has finished
    (and always when learn_router is off); a LearnedRouter whose `.router` is None says in `.reason`
    why the log was not enough.
    """

    learn_retry_s = 60.0

    def __init__(self, url: str, interval_s: float = 1.0, *, learn_router: bool = False,
                 router_models: Iterable[str] | None = None, router_settings: RouterSettings | None = None,
                 exact_ttl_s: float | None = None, exact_capacity: int = 5_000_000,
                 semantic_window_h: int | None = None,
                 cache_scope: Callable[[str], str] | None = None):
        self.url = url
        self.interval_s = interval_s
        self.learn_router = learn_router
        self.router_models = None if router_models is None else frozenset(router_models)
        self.router_settings = router_settings or RouterSettings()
        self.learned: LearnedRouter | None = None
        self._learn_task: asyncio.Task | None = None
        self._learn_again = False
        self._learn_retry_at: float | None = None
        self._keys: dict[bytes, tuple[str, str]] = {}
        self.rules = RuleBook()
        # Deployed fine-tunes; `registry_version` moves whenever the list is re-read.
        self.registry: list[RegisteredModel] = []
        self.registry_version = 0
        self._versions: dict[str, int] = {}
        # The exact cache's pre-filter (cache.RecentHashes), when the cache is on.
        # Both held per cache scope (`cache_scope`: user id -> cache.scope_key).
        self.hashes = RecentHashes(exact_ttl_s, cache_scope, exact_capacity) if exact_ttl_s else None
        # The semantic cache's pre-filter (cache.CacheContexts), when it is on.
        self.contexts = CacheContexts(semantic_window_h, cache_scope) if semantic_window_h else None
        self._task: asyncio.Task | None = None
        # (state names, async reload(conn)) of other holders of Postgres state (the guard's budgets).
        self._watchers: list[tuple[tuple[str, ...], Callable[[psycopg.AsyncConnection], Awaitable[None]]]] = []

    def watch(self, names: tuple[str, ...], reload: Callable[[psycopg.AsyncConnection], Awaitable[None]]) -> None:
        """Call `reload` on the poller's connection whenever one of `names` moves in tm_state_versions."""
        self._watchers.append((names, reload))

    def lookup(self, key: str | None) -> tuple[str, str] | None:
        if not key:
            return None
        return self._keys.get(hashlib.sha256(key.encode()).digest())

    def load(self) -> None:
        """The first, blocking load at start-up: a gateway that cannot read its keys must not start."""
        with connect(self.url) as conn:
            self._versions = dict(conn.execute("SELECT name, version FROM tm_state_versions").fetchall())
            self._keys = active_keys(conn)
            self.rules = load_rulebook(conn)
            self.registry = load_registry(conn)
            self.registry_version += 1
            if self.hashes is not None:
                self.hashes.load(conn)
            if self.contexts is not None:
                self.contexts.load(conn)

    async def _poll(self) -> None:
        conn: psycopg.AsyncConnection | None = None
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                cur = await conn.execute("SELECT name, version FROM tm_state_versions")
                versions: dict[str, int] = dict(await cur.fetchall())
                if versions.get("api_keys") != self._versions.get("api_keys"):
                    cur = await conn.execute(ACTIVE_KEYS_SQL)
                    self._keys = key_map(await cur.fetchall())
                    log.info("api keys reloaded: %d in force", len(self._keys))
                relearn = False
                loop_rules = versions.get("routing_rules") != self._versions.get("routing_rules")
                if loop_rules or versions.get("operator_rules") != self._versions.get("operator_rules"):
                    self.rules = await asyncio.to_thread(self._read_rules)
                    log.info("routing rules reloaded: %d in force (hour %s)", len(self.rules), self.rules.hour)
                    # The loop has finished an hour: its new scores are in the log.
                    relearn = loop_rules
                if versions.get("model_registry") != self._versions.get("model_registry"):
                    self.registry = await asyncio.to_thread(self._read_registry)
                    self.registry_version += 1
                    log.info("model registry reloaded: %d deployed models", len(self.registry))
                if self.contexts is not None and versions.get("cache_entries") != self._versions.get("cache_entries"):
                    await asyncio.to_thread(self._read_contexts)
                    log.info("cache contexts reloaded: %d with entries", len(self.contexts))
                for names, reload in self._watchers:
                    if any(versions.get(n) != self._versions.get(n) for n in names):
                        await reload(conn)
                self._versions = versions
                if self.hashes is not None:
                    await self.hashes.refresh(conn)
                if self.learn_router and (relearn or (self._learn_retry_at is not None
                                                      and time.monotonic() >= self._learn_retry_at)):
                    self._schedule_learn()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep serving with what we hold
                log.warning("state refresh failed (%s); keeping the last keys and rules", type(err).__name__)
                if conn is not None:
                    await conn.close()
                conn = None

    def _schedule_learn(self) -> None:
        """(Re-)fit the learned router in a task of its own, so keys and rules keep refreshing while it
        runs; new rules arriving meanwhile ask for one more load once this one ends."""
        if self._learn_task is not None and not self._learn_task.done():
            self._learn_again = True
            return
        self._learn_retry_at = None
        self._learn_task = asyncio.get_running_loop().create_task(self._learn(), name="tm-router-learn")

    async def _learn(self) -> None:
        while True:
            self._learn_again = False
            try:
                learned = await asyncio.to_thread(self.read_learned)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep routing with the router held
                self._learn_retry_at = time.monotonic() + self.learn_retry_s
                log.warning("learned router reload failed (%s: %s); keeping the last one, retrying in %.0f s",
                            type(err).__name__, err, self.learn_retry_s)
            else:
                self.learned = learned
                log.info("learned router reloaded: %s", learned.reason)
            if not self._learn_again:
                return

    def router_choices(self) -> frozenset[str] | None:
        """The models the learned router may choose: the configured ones and the deployed fine-tunes."""
        if self.router_models is None:
            return None
        return self.router_models | {m.name for m in self.registry}

    def read_learned(self) -> LearnedRouter:
        """Fit the learned router now (blocking: a thread or a test, never the event loop)."""
        with connect(self.url) as conn:
            return load_with(conn, self.router_settings, self.router_choices())

    def _read_registry(self) -> list[RegisteredModel]:
        with connect(self.url) as conn:
            return load_registry(conn)

    def _read_contexts(self) -> None:
        if self.contexts is None:
            return
        with connect(self.url) as conn:
            self.contexts.load(conn)

    def _read_rules(self) -> RuleBook:
        with connect(self.url) as conn:
            return load_rulebook(conn)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="tm-state-refresh")
        if self.learn_router:
            self._schedule_learn()

    async def stop(self) -> None:
        for task in (self._task, self._learn_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
