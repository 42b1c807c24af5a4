"""What a replica holds in memory from Postgres (API keys, routing rules), re-read only when its version moves."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import psycopg

from tm_resources.db import connect
from tm_resources.keys import active_keys
from tm_resources.registry import RegisteredModel, load_registry
from tm_resources.rules import RuleBook, load_rulebook

log = logging.getLogger(__name__)


class SharedState:
    """sha256(key) -> (key id, user id), and the rule book; each re-read when `tm_state_versions` says
    its table changed, so a request never waits on a query."""

    def __init__(self, url: str, interval_s: float = 1.0):
        self.url = url
        self.interval_s = interval_s
        self._keys: dict[bytes, tuple[str, str]] = {}
        self.rules = RuleBook()
        # Deployed fine-tunes; `registry_version` moves whenever the list is re-read.
        self.registry: list[RegisteredModel] = []
        self.registry_version = 0
        self._versions: dict[str, int] = {}
        self._task: asyncio.Task | None = None

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

    async def _poll(self) -> None:
        conn: psycopg.AsyncConnection | None = None
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                cur = await conn.execute("SELECT name, version FROM tm_state_versions")
                versions = dict(await cur.fetchall())
                if versions.get("api_keys") != self._versions.get("api_keys"):
                    cur = await conn.execute(
                        "SELECT key_hash, id, user_id FROM api_keys WHERE revoked_at IS NULL"
                    )
                    self._keys = {bytes(h): (kid, uid) for h, kid, uid in await cur.fetchall()}
                    log.info("api keys reloaded: %d in force", len(self._keys))
                if versions.get("routing_rules") != self._versions.get("routing_rules"):
                    self.rules = await asyncio.to_thread(self._read_rules)
                    log.info("routing rules reloaded: %d in force (hour %s)", len(self.rules), self.rules.hour)
                if versions.get("model_registry") != self._versions.get("model_registry"):
                    self.registry = await asyncio.to_thread(self._read_registry)
                    self.registry_version += 1
                    log.info("model registry reloaded: %d deployed models", len(self.registry))
                self._versions = versions
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep serving with what we hold
                log.warning("state refresh failed (%s); keeping the last keys and rules", type(err).__name__)
                if conn is not None:
                    await conn.close()
                conn = None

    def _read_registry(self) -> list[RegisteredModel]:
        with connect(self.url) as conn:
            return load_registry(conn)

    def _read_rules(self) -> RuleBook:
        with connect(self.url) as conn:
            return load_rulebook(conn)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="tm-state-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
