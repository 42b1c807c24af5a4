"""Per-user API keys: created once and shown once, stored only as a hash, revocable."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from tm_resources.db import one

KEY_PREFIX = "tm-"


def hash_key(key: str) -> bytes:
    # Keys are 240 random bits, so a plain fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    user_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    admin: bool = False


def create_key(conn: psycopg.Connection, user_id: str, *, admin: bool = False) -> tuple[str, KeyInfo]:
    """Make a new key for `user_id` (an admin key with `admin`); the plain key is returned here and never again."""
    user_id = user_id.strip()
    if not user_id:
        raise ValueError("a key needs a user name")
    key = KEY_PREFIX + secrets.token_urlsafe(30)
    key_id = "k_" + secrets.token_hex(4)
    row = one(conn.execute(
        "INSERT INTO api_keys (id, user_id, key_hash, prefix, admin) VALUES (%s, %s, %s, %s, %s)"
        " RETURNING id, user_id, prefix, created_at, revoked_at, admin",
        (key_id, user_id, hash_key(key), key[:7], admin),
    ))
    conn.commit()
    return key, KeyInfo(*row)


def list_keys(conn: psycopg.Connection, *, include_revoked: bool = False) -> list[KeyInfo]:
    sql = "SELECT id, user_id, prefix, created_at, revoked_at, admin FROM api_keys"
    if not include_revoked:
        sql += " WHERE revoked_at IS NULL"
    return [KeyInfo(*r) for r in conn.execute(sql + " ORDER BY user_id, created_at")]


def key_in_force(conn: psycopg.Connection, key: str | None) -> KeyInfo | None:
    """The key's record if it is in force (for sign-in to the dashboard and MCP; the request path uses the
    in-memory map instead)."""
    if not key:
        return None
    row = conn.execute("SELECT id, user_id, prefix, created_at, revoked_at, admin FROM api_keys"
                       " WHERE key_hash = %s AND revoked_at IS NULL", (hash_key(key),)).fetchone()
    return KeyInfo(*row) if row else None


def revoke(conn: psycopg.Connection, key_id_or_user: str) -> list[str]:
    """Revoke one key by its id, or every key of a user; return the ids revoked."""
    rows = conn.execute(
        "UPDATE api_keys SET revoked_at = now()"
        " WHERE revoked_at IS NULL AND (id = %s OR user_id = %s) RETURNING id",
        (key_id_or_user, key_id_or_user),
    ).fetchall()
    conn.commit()
    return [r[0] for r in rows]


# The keys in force, read by the CLI (sync) and by each replica's state poller (async).
ACTIVE_KEYS_SQL = "SELECT key_hash, id, user_id FROM api_keys WHERE revoked_at IS NULL"


def key_map(rows) -> dict[bytes, tuple[str, str]]:
    """hash -> (key id, user id): what a gateway replica holds in memory."""
    return {bytes(h): (kid, uid) for h, kid, uid in rows}


def active_keys(conn: psycopg.Connection) -> dict[bytes, tuple[str, str]]:
    """hash -> (key id, user id) for every key in force."""
    return key_map(conn.execute(ACTIVE_KEYS_SQL))
