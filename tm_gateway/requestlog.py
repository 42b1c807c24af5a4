"""The request log writer: rows leave the hot path through a queue, reach Postgres in batched COPYs,
and wait on local disk whenever Postgres cannot take them, so that no row is ever lost."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psycopg
from pgvector.psycopg import register_vector

log = logging.getLogger(__name__)

# The columns the gateway writes, in COPY order. A row is a dict with any subset of these keys.
COLUMNS = (
    "id", "ts", "user_id", "api_key_id", "api_format", "endpoint", "session_id", "agent",
    "requested_model", "model", "provider", "upstream_model", "stream", "system", "prompt",
    "messages", "params", "response_text", "finish_reason", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "cost_usd", "latency_ms", "ttft_ms", "status",
    "error_class", "error_message", "route", "route_reason", "task_type", "prompt_embedding",
    "parent_id", "baseline_cost_usd", "attempts", "request_hash", "context_hash", "cache_hit",
    "cache_source_id", "cache_similarity", "served",
)  # fmt: skip
_VECTOR_AT = COLUMNS.index("prompt_embedding")
# COPY writes NULL for a missing value, so the NOT NULL columns' defaults are filled in here.
_DEFAULTS = {"stream": False, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
             "cache_write_tokens": 0, "cost_usd": 0.0, "served": True}
_COPY = f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN"


def copy_row(row: dict) -> tuple:
    """A row dict as the tuple COPY takes, with the NOT NULL columns' defaults filled in."""
    return tuple(row.get(c, _DEFAULTS.get(c)) for c in COLUMNS)


def _spool_default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return str(obj)
    raise TypeError


def _dump_spooled(row: tuple) -> bytes:
    return orjson.dumps(row, default=_spool_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _load_spooled(line: bytes) -> tuple:
    row = orjson.loads(line)
    # Spooled by an older version with fewer columns (new ones are appended): the rest are NULL.
    row += [_DEFAULTS.get(c) for c in COLUMNS[len(row):]]
    if row[_VECTOR_AT] is not None:
        # A list would be sent as a Postgres array; the vector column wants the vector form.
        row[_VECTOR_AT] = np.asarray(row[_VECTOR_AT], dtype=np.float32)
    return tuple(row)


class RequestLog:
    """Accepts rows from any thread without blocking; one writer thread does the I/O."""

    def __init__(self, url: str, *, spool_dir: Path, batch_max_rows: int = 1000, flush_interval_s: float = 0.1,
                 replay_interval_s: float = 5.0):
        self.url = url
        self.replay_interval_s = replay_interval_s
        self.spool_dir = spool_dir
        self.batch_max_rows = batch_max_rows
        self.flush_interval_s = flush_interval_s
        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_rejected = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None
        self._next_replay = 0.0

    # -- the caller's side -------------------------------------------------------------------

    def write(self, row: dict) -> None:
        self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row written before this call is in Postgres or on disk."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def start(self) -> RequestLog:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="tm-request-log", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Write out everything queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        self._replay_spool()
        stopping = False
        while not stopping:
            batch, markers, stopping = self._next_batch()
            if batch:
                self._write_batch(batch)
            if time.monotonic() >= self._next_replay:
                self._replay_spool()
            for m in markers:
                m.set()

    def _next_batch(self) -> tuple[list[dict], list[threading.Event], bool]:
        """Wait for a first row, let the batch fill for one flush interval, then take what is there.
        Sleeping rather than waking per row keeps the writer off the CPU the event loop needs."""
        batch: list[dict] = []
        markers: list[threading.Event] = []
        try:
            item = self._queue.get(timeout=1.0)
        except queue.Empty:
            return batch, markers, False
        if not isinstance(item, threading.Event) and item is not None:
            time.sleep(self.flush_interval_s)
        while True:
            if item is None:
                return batch + self._drain(markers), markers, True
            if isinstance(item, threading.Event):
                markers.append(item)  # a flush marker ends the batch at once
                return batch, markers, False
            batch.append(item)
            if len(batch) >= self.batch_max_rows:
                return batch, markers, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, markers, False

    def _drain(self, markers: list[threading.Event]) -> list[dict]:
        rest: list[dict] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rest
            if isinstance(item, threading.Event):
                markers.append(item)
            elif item is not None:
                rest.append(item)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, connect_timeout=5)
            register_vector(self._conn)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _copy(self, rows: list[tuple]) -> None:
        conn = self._connection()
        try:
            with conn.cursor() as cur, cur.copy(_COPY) as copy:
                for r in rows:
                    copy.write_row(r)
            conn.commit()
        except BaseException:
            self._drop_connection()
            raise

    def _write_batch(self, batch: list[dict]) -> None:
        rows = [copy_row(r) for r in batch]
        try:
            self._copy(rows)
            self.rows_written += len(rows)
        except psycopg.OperationalError as err:
            log.warning("request log: Postgres unavailable (%s); spooling %d rows", type(err).__name__, len(rows))
            self._spool(rows)
        except Exception as err:  # noqa: BLE001 - a row Postgres refuses must not take its batch down with it
            log.error("request log: batch refused (%s: %s); writing rows one by one", type(err).__name__, err)
            for r in rows:
                try:
                    self._copy([r])
                    self.rows_written += 1
                except psycopg.OperationalError:
                    self._spool([r])
                except Exception as row_err:  # noqa: BLE001
                    self._reject([r], f"{type(row_err).__name__}: {row_err}")

    def _reject(self, rows: list[tuple], reason: str) -> None:
        """Keep rows Postgres will never take where an operator can see them, out of the replay queue."""
        rejected = self.spool_dir / "rejected"
        rejected.mkdir(parents=True, exist_ok=True)
        with (rejected / f"{time.time_ns()}.jsonl").open("wb") as f:
            for r in rows:
                f.write(_dump_spooled(r) + b"\n")
        self.rows_rejected += len(rows)
        log.error("request log: %d row(s) refused by Postgres (%s), kept in %s", len(rows), reason, rejected)

    def _spool(self, rows: list[tuple]) -> None:
        # Worker processes of one gateway share the spool folder: names must not collide.
        path = self.spool_dir / f"{time.time_ns()}-{os.getpid()}.jsonl"
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            for r in rows:
                f.write(_dump_spooled(r) + b"\n")
            f.flush()
        tmp.rename(path)
        self.rows_spooled += len(rows)
        self._next_replay = time.monotonic() + self.replay_interval_s

    def _replay_spool(self) -> None:
        """Move spooled rows into Postgres; a row already there (an earlier replay) is skipped."""
        files = sorted(self.spool_dir.glob("*.jsonl"))
        for path in files:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue  # another worker replayed it
            rows = [_load_spooled(line) for line in raw.splitlines() if line.strip()]
            try:
                conn = self._connection()
                with conn.cursor() as cur:
                    cur.execute("CREATE TEMP TABLE IF NOT EXISTS requests_replay (LIKE requests) ON COMMIT DELETE ROWS")
                    with cur.copy(_COPY.replace("COPY requests ", "COPY requests_replay ")) as copy:
                        for r in rows:
                            copy.write_row(r)
                    cur.execute(
                        f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM requests_replay"
                        " ON CONFLICT (id, ts) DO NOTHING"
                    )
                conn.commit()
            except psycopg.OperationalError as err:
                self._drop_connection()
                log.warning("request log: replay of %s deferred (%s)", path.name, type(err).__name__)
                self._next_replay = time.monotonic() + self.replay_interval_s
                return
            except Exception as err:  # noqa: BLE001 - a file Postgres refuses must not block the ones after it
                self._drop_connection()
                self._reject(rows, f"{type(err).__name__}: {err}")
                path.unlink(missing_ok=True)
                continue
            path.unlink(missing_ok=True)
            self.rows_written += len(rows)
            log.info("request log: replayed %d spooled rows from %s", len(rows), path.name)
        self._next_replay = time.monotonic() + self.replay_interval_s if files else float("inf")

