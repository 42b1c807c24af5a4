"""The request log writer: rows leave the hot path through a queue, reach Postgres in batched COPYs,
and wait on local disk whenever Postgres cannot take them, so that no row is ever lost."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg
from pgvector.psycopg import register_vector

from tm_gateway.logrows import (
    COLUMNS,
    MESSAGES_AT,
    REDACT_TEXT_AT,
    copy_row,
    dump_row,
    escape_nul,
    folder_bytes,
    map_strings,
    private_dir,
    read_rows,
    row_dict,
    write_private,
)
from tm_resources.redact import redact

log = logging.getLogger(__name__)

_COPY = f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN"
_REPLAY_COPY = f"COPY requests_replay ({', '.join(COLUMNS)}) FROM STDIN"
# RETURNING: the rows a replay stored for the first time (the others were already there).
_REPLAY_INSERT = (f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM requests_replay"
                  " ON CONFLICT (id, ts) DO NOTHING RETURNING id")
# A spool file made of a dead process's journal (`_recover_journals`); other spool files are <ns>-<pid>.jsonl.
_RECOVERED_PREFIX = "journal-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _SegmentEnd:
    """Queued after the last row of a journal segment: once the writer has stored every row before
    it, the segment is no longer needed."""

    path: Path


class RequestLog:
    """Accepts rows from any thread without blocking; one writer thread does the I/O.

    journal: "write" appends each row to a local file (spool_dir/journal-<pid>-<n>.wal) before it is
    queued, so a process killed with rows still queued loses none: the next writer to start, or any
    live one sharing the spool folder, replays a dead process's journal (duplicates are skipped).
    "fsync" also flushes it to disk per row (a power cut); "off" journals nothing.
    """

    def __init__(self, url: str, *, spool_dir: Path, batch_max_rows: int = 1000, flush_interval_s: float = 0.1,
                 replay_interval_s: float = 5.0, journal: str = "off", redact_secrets: bool = False,
                 redact_pii: bool = False, spool_max_bytes: int = 1 << 30, rejected_max_bytes: int = 100 << 20):
        self.url = url
        self.replay_interval_s = replay_interval_s
        self.spool_dir = spool_dir
        self.rejected_dir = spool_dir / "rejected"
        self.batch_max_rows = batch_max_rows
        self.flush_interval_s = flush_interval_s
        self.journal = journal
        self.redact_secrets = redact_secrets
        self.redact_pii = redact_pii
        self.spool_max_bytes = spool_max_bytes
        self.rejected_max_bytes = rejected_max_bytes
        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_rejected = 0
        self.rows_dropped = 0  # spool or rejected folder full
        # Rows done but held until their response is sent (stages/log.py Row): changed by the event
        # loop's thread only, read by `flush`.
        self.parked = 0
        # Called by the writer thread with each batch of new rows once it is stored or spooled (metrics,
        # analytics): whatever they cost is paid here, off the request path. Each row reaches them once:
        # when first written, or, for a dead process's journal, when replayed (`_replay_spool`).
        self.observers: list[Callable[[RequestLog, list[dict]], None]] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None
        self._next_replay = 0.0
        self._lock = threading.Lock()
        self._journal_fd: int | None = None
        self._journal_path: Path | None = None
        self._journal_rows = 0
        self._journal_seq = 0
        self._journal_failed = False

    # -- the caller's side -------------------------------------------------------------------

    def write(self, row: dict) -> None:
        if self._journal_fd is None:
            self._queue.put(row)
            return
        line = dump_row(copy_row(row)) + b"\n"
        with self._lock:
            # Journal and queue in one step, so a segment's rows all sit before its end marker.
            if self._journal_fd is not None:
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(self._journal_fd, view):]
                    if self.journal == "fsync":
                        os.fsync(self._journal_fd)
                    self._journal_rows += 1
                except OSError as err:  # a full disk must not cost the request its answer
                    if not self._journal_failed:
                        log.error("request log: journal write failed (%s); rows still go to Postgres", err)
                    self._journal_failed = True
            self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row written before this call is in Postgres or on disk, with the rows of
        requests answered but not yet handed over (`parked`: microseconds, stages/log.py Row.release)."""
        deadline = time.monotonic() + timeout
        while self.parked > 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        done = threading.Event()
        self._queue.put(done)
        return done.wait(max(0.0, deadline - time.monotonic()))

    def start(self) -> RequestLog:
        private_dir(self.spool_dir)
        if self.journal != "off":
            with self._lock:
                self._open_segment()
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

    def rejected_on_disk(self) -> int:
        """Bytes of rows Postgres refused, waiting in spool/rejected for `tm log replay-rejected`."""
        return folder_bytes(self.rejected_dir, "*.jsonl")

    # -- the journal -------------------------------------------------------------------------

    def _open_segment(self) -> None:
        self._journal_seq += 1
        self._journal_path = self.spool_dir / f"journal-{os.getpid()}-{self._journal_seq}.wal"
        self._journal_fd = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._journal_rows = 0

    def _rotate(self) -> Path | None:
        """Start a new journal segment and queue the old one's end; None when nothing was journaled."""
        with self._lock:
            if self._journal_fd is None or self._journal_path is None or self._journal_rows == 0:
                return None
            old_fd, old_path = self._journal_fd, self._journal_path
            self._open_segment()
            self._queue.put(_SegmentEnd(old_path))
        os.close(old_fd)
        return old_path

    def _recover_journals(self) -> int:
        """A journal left by a process that died (kill -9, a crash) becomes a spool file to replay
        (journal-<pid>-<n>.jsonl: the name tells `_replay_spool` some of its rows may never have been
        observed); returns how many were found."""
        found = 0
        for path in self.spool_dir.glob("journal-*.wal"):
            if path == self._journal_path:
                continue
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            # This process's own pid on an old file: a previous life of a container's pid 1.
            if pid != os.getpid() and _pid_alive(pid):
                continue
            try:
                path.rename(path.with_suffix(".jsonl"))
                found += 1
                log.info("request log: recovering the journal %s of a process that ended", path.name)
            except FileNotFoundError:
                pass  # another worker took it
        return found

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        self._recover_journals()
        self._replay_spool()
        stopping = False
        next_recovery = time.monotonic() + self.replay_interval_s
        while not stopping:
            stopping = self._cycle()
            if stopping:
                break
            now = time.monotonic()
            # Another worker sharing the folder may have been killed: its journal waits for us.
            if now >= next_recovery:
                next_recovery = now + self.replay_interval_s
                if self._recover_journals():
                    self._next_replay = now
            if now >= self._next_replay:
                self._replay_spool()
        if any(self.spool_dir.glob("*.jsonl")):
            self._replay_spool()  # Postgres may be back since the last try: leave nothing behind needlessly

    def _cycle(self) -> bool:
        """Wait for a first row, let the batch fill for one flush interval, then store what is there
        (with a journal: exactly the rows of the segment just closed). Sleeping rather than waking per
        row keeps the writer off the CPU the event loop needs. Returns True once asked to stop."""
        try:
            item = self._queue.get(timeout=1.0)
        except queue.Empty:
            return False
        if isinstance(item, dict):
            time.sleep(self.flush_interval_s)
        segment = self._rotate()
        batch: list[dict] = []
        markers: list[threading.Event] = []
        ended: list[Path] = []
        stopping = False
        while True:
            if item is None:
                stopping = True
            elif isinstance(item, threading.Event):
                markers.append(item)
            elif isinstance(item, _SegmentEnd):
                ended.append(item.path)
            else:
                batch.append(item)
                if len(batch) >= self.batch_max_rows:
                    self._write_batch(batch)
                    batch = []
                    if segment is None and not stopping:
                        break  # no journal: a full batch is a cycle, so replays get their turn
            # With a segment closed, its end marker is in the queue: take everything up to it.
            if segment is not None and segment in ended and not stopping:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if stopping:
                    batch += self._final_drain(markers, ended)
                break
        if batch:
            self._write_batch(batch)
        for path in ended:
            path.unlink(missing_ok=True)
        for m in markers:
            m.set()
        return stopping

    def _final_drain(self, markers: list[threading.Event], ended: list[Path]) -> list[dict]:
        """Everything still queued at close, taken with the journal closed so none can slip in after."""
        rest: list[dict] = []
        with self._lock:
            if self._journal_fd is not None and self._journal_path is not None:
                os.close(self._journal_fd)
                ended.append(self._journal_path)
                self._journal_fd = None
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return rest
                if isinstance(item, threading.Event):
                    markers.append(item)
                elif isinstance(item, _SegmentEnd):
                    ended.append(item.path)
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

    def _stored(self, row: tuple, redacted: dict[str, str] | None = None) -> tuple:
        """The row as Postgres keeps it: secrets (and PII) redacted as configured, NUL escaped. Spool
        and journal files hold the row as it came, so a replay applies the same rules again.
        `redacted` (text -> its redacted form) is shared by the rows of one batch: a prompt is also in
        its row's messages, and a system prompt or a conversation's history comes again on every turn."""
        r = list(row)
        if self.redact_secrets or self.redact_pii:
            memo = {} if redacted is None else redacted
            changed = False

            def clean(text: str) -> str:
                nonlocal changed
                out = memo.get(text)
                if out is None:
                    out = memo[text] = redact(text, secrets=self.redact_secrets, pii=self.redact_pii)
                changed = changed or out != text
                return out

            for i in REDACT_TEXT_AT:
                if r[i]:
                    r[i] = clean(r[i])
            if r[MESSAGES_AT]:
                changed = False
                messages = map_strings(orjson.loads(r[MESSAGES_AT]), clean)
                if changed:  # else nothing was redacted, and the JSON text stays as it came
                    r[MESSAGES_AT] = orjson.dumps(messages).decode()
        escape_nul(r)
        return tuple(r)

    def _copy(self, rows: list[tuple], dedupe: bool) -> set[str] | None:
        """One COPY of `rows` (in their stored form); `dedupe` (replays) skips rows already in Postgres
        and returns the ids of those it stored."""
        conn = self._connection()
        stored = None
        try:
            with conn.cursor() as cur:
                if dedupe:
                    cur.execute("CREATE TEMP TABLE IF NOT EXISTS requests_replay (LIKE requests) ON COMMIT DELETE ROWS")
                with cur.copy(_REPLAY_COPY if dedupe else _COPY) as copy:
                    for r in rows:
                        copy.write_row(r)
                if dedupe:
                    cur.execute(_REPLAY_INSERT)
                    stored = {str(i) for (i,) in cur.fetchall()}
            conn.commit()
            return stored
        except psycopg.OperationalError:
            self._drop_connection()
            raise
        except psycopg.Error:
            # Refused (bad data): the connection is sound, and reconnecting for each half of a
            # bisected batch would cost more than the COPYs themselves.
            try:
                conn.rollback()
            except psycopg.Error:
                self._drop_connection()
            raise
        except BaseException:
            self._drop_connection()
            raise

    def _land(self, rows: list[tuple], dedupe: bool, new_ids: set[str] | None = None) -> list[tuple[tuple, str]]:
        """Store `rows`; return those Postgres refuses, each with the reason. A refused batch is cut in
        halves until the bad rows stand alone, so k bad rows in n cost about 2k·log2(n) COPYs and the
        good rows land in the same pass. Raises OperationalError when Postgres cannot be reached.
        A replay (`dedupe`) adds to `new_ids` the ids of the rows that were not in Postgres before."""
        redacted: dict[str, str] = {}
        return self._bisect(rows, [self._stored_or_raw(r, redacted) for r in rows], dedupe,
                            set() if new_ids is None else new_ids)

    def _stored_or_raw(self, row: tuple, redacted: dict[str, str]) -> tuple:
        try:
            return self._stored(row, redacted)
        except Exception as err:  # noqa: BLE001 - the writer thread must live on; Postgres judges the row
            log.error("request log: a row could not be prepared for storage (%s)", type(err).__name__)
            return row

    def _bisect(self, rows: list[tuple], stored: list[tuple], dedupe: bool,
                new_ids: set[str]) -> list[tuple[tuple, str]]:
        try:
            ids = self._copy(stored, dedupe)
            # A replayed row already in Postgres was counted when it was first written.
            self.rows_written += len(rows) if ids is None else len(ids)
            if ids:
                new_ids |= ids
            return []
        except psycopg.OperationalError:
            raise
        except Exception as err:  # noqa: BLE001 - a row Postgres refuses must not take its batch down with it
            if len(rows) == 1:
                return [(rows[0], _reason(err))]
            mid = len(rows) // 2
            return (self._bisect(rows[:mid], stored[:mid], dedupe, new_ids)
                    + self._bisect(rows[mid:], stored[mid:], dedupe, new_ids))

    def _write_batch(self, batch: list[dict]) -> None:
        rows = [copy_row(r) for r in batch]
        try:
            refused = self._land(rows, dedupe=False)
        except psycopg.OperationalError as err:
            log.warning("request log: Postgres unavailable (%s); spooling %d rows", type(err).__name__, len(rows))
            self._spool(rows)
        else:
            if refused:
                self._reject([r for r, _ in refused], refused[0][1])
        self._observe(batch)

    def _observe(self, batch: list[dict]) -> None:
        for observe in self.observers:
            try:
                observe(self, batch)
            except Exception:  # noqa: BLE001 - an observer's fault must not stop the log
                log.exception("request log: observer %s failed", getattr(observe, "__qualname__", observe))

    def spooled_on_disk(self) -> int:
        """Bytes of rows waiting in the spool folder for Postgres to come back."""
        return folder_bytes(self.spool_dir, "*.jsonl")

    def queued(self) -> int:
        """Rows (and markers) waiting for the writer thread."""
        return self._queue.qsize()

    def _reject(self, rows: list[tuple], reason: str) -> None:
        """Keep rows Postgres will never take where an operator can see them (`tm log replay-rejected`),
        out of the replay queue: one file per batch, within log.rejected_max_mb."""
        rejected = private_dir(self.rejected_dir)
        if self.rejected_on_disk() >= self.rejected_max_bytes:
            self.rows_dropped += len(rows)
            log.error("request log: %d row(s) refused by Postgres (%s) and dropped: %s is full (log.rejected_max_mb)",
                      len(rows), reason, rejected)
            return
        write_private(rejected / f"{time.time_ns()}-{os.getpid()}.jsonl", rows)
        self.rows_rejected += len(rows)
        log.error("request log: %d row(s) refused by Postgres (%s), kept in %s", len(rows), reason, rejected)

    def _spool(self, rows: list[tuple]) -> None:
        if folder_bytes(self.spool_dir, "*.jsonl") >= self.spool_max_bytes:
            self.rows_dropped += len(rows)
            log.error("request log: spool %s is full (log.spool_max_mb); %d rows dropped", self.spool_dir, len(rows))
            return
        # Worker processes of one gateway share the spool folder: names must not collide.
        write_private(self.spool_dir / f"{time.time_ns()}-{os.getpid()}.jsonl", rows)
        self.rows_spooled += len(rows)
        self._next_replay = time.monotonic() + self.replay_interval_s

    def _replay_spool(self) -> None:
        """Move spooled rows into Postgres; a row already there (an earlier replay) is skipped.

        Which replayed rows the observers (metrics, analytics) see: each row once in all. A spool file's
        rows were handed to them by the process that spooled them, as it spooled them (`_write_batch`), so
        they are not handed over again. A dead process's journal holds rows it had accepted but maybe not
        stored: those it stored it had also observed, those it had not (still queued when it was killed)
        nobody ever counted. So of a recovered journal the observers get the rows this replay stores for
        the first time, and those Postgres refuses (observed like a live batch's refused rows). Only a
        process killed in the instant between storing a batch and observing it (or between spooling
        it and ending its journal segment) is miscounted, by that batch."""
        files = sorted(self.spool_dir.glob("*.jsonl"))
        for path in files:
            try:
                rows = read_rows(path)
            except FileNotFoundError:
                continue  # another worker replayed it
            new_ids: set[str] = set()
            try:
                refused = self._land(rows, dedupe=True, new_ids=new_ids) if rows else []
            except psycopg.OperationalError as err:
                log.warning("request log: replay of %s deferred (%s)", path.name, type(err).__name__)
                self._next_replay = time.monotonic() + self.replay_interval_s
                return
            if refused:
                self._reject([r for r, _ in refused], refused[0][1])
            if path.name.startswith(_RECOVERED_PREFIX) and self.observers:
                unseen = [r for r in rows if str(r[0]) in new_ids] + [r for r, _ in refused]
                if unseen:
                    self._observe([row_dict(r) for r in unseen])
            path.unlink(missing_ok=True)
            log.info("request log: replayed %d spooled rows from %s", len(rows) - len(refused), path.name)
        self._next_replay = time.monotonic() + self.replay_interval_s if files else float("inf")

    def replay_rejected(self) -> tuple[int, int]:
        """Try the rejected rows again (after a fix, or with the rules of this version: NUL escaped);
        those Postgres still refuses stay. Returns (rows stored or already there, rows still refused)."""
        landed = kept = 0
        for path in sorted(self.rejected_dir.glob("*.jsonl")):
            rows = read_rows(path)
            refused = self._land(rows, dedupe=True) if rows else []
            landed += len(rows) - len(refused)
            kept += len(refused)
            if refused:
                write_private(path, [r for r, _ in refused])
                log.error("request log: %d row(s) in %s still refused (%s)", len(refused), path.name, refused[0][1])
            else:
                path.unlink()
        self._drop_connection()
        return landed, kept


def _reason(err: Exception) -> str:
    """Why Postgres refused a row, without its data (an error's text may quote the value)."""
    diag = getattr(err, "diag", None)
    parts = [type(err).__name__]
    if diag is not None:
        parts += [p for p in (diag.sqlstate, diag.column_name and f"column {diag.column_name}") if p]
    return " ".join(parts)
