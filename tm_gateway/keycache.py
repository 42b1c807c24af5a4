"""What a replica holds in memory from Postgres (API keys now), re-read only when its version moves."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import psycopg

from tm_resources.keys import active_keys

log = logging.getLogger(__name__)


class KeyCache:
    """sha256(key) -> (key id, user id), refreshed from `api_keys` when `tm_state_versions` says it changed."""

    def __init__(self, url: str, interval_s: float = 1.0):
        self.url = url
        self.interval_s = interval_s
        self._keys: dict[bytes, tuple[str, str]] = {}
        self._versions: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def lookup(self, key: str | None) -> tuple[str, str] | None:
        if not key:
            return None
        return self._keys.get(hashlib.sha256(key.encode()).digest())

    def load(self) -> None:
        """The first, blocking load at start-up: a gateway that cannot read its keys must not start."""
        with psycopg.connect(self.url) as conn:
            self._versions = dict(conn.execute("SELECT name, version FROM tm_state_versions").fetchall())
            self._keys = active_keys(conn)

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
                self._versions = versions
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep serving with what we hold
                log.warning("state refresh failed (%s); keeping the last keys", type(err).__name__)
                if conn is not None:
                    await conn.close()
                conn = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="tm-state-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
