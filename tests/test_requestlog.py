"""The request log writer against a real Postgres that is there, is not, and comes back."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import psycopg

from tm_gateway.requestlog import RequestLog, copy_row
from tm_resources import db
from tm_gateway.ids import uuid7


def row(i: int, **extra) -> dict:
    return {"id": uuid7(), "ts": datetime.now(timezone.utc), "user_id": "u1", "api_format": "openai",
            "endpoint": "/v1/chat/completions", "status": 200, "prompt": f"p{i}", **extra}


def count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]


def test_rows_are_batched_into_postgres_with_column_defaults(db_url, tmp_path):
    log = RequestLog(db_url, spool_dir=tmp_path / "spool", flush_interval_s=0.05).start()
    for i in range(500):
        log.write(row(i))
    assert log.flush()
    log.close()
    assert count(db_url) == 500
    with psycopg.connect(db_url) as conn:
        tokens, cost, stream = conn.execute(
            "SELECT sum(input_tokens), sum(cost_usd), bool_or(stream) FROM requests").fetchone()
    assert (tokens, cost, stream) == (0, 0.0, False)


def test_an_outage_spools_to_disk_and_the_rows_arrive_when_postgres_is_back(pg_server, tmp_path):
    # The database does not exist yet: every connection fails as it would with Postgres down.
    name = "t_outage_" + uuid.uuid4().hex[:8]
    url = db.with_database(pg_server, name)
    spool = tmp_path / "spool"
    log = RequestLog(url, spool_dir=spool, flush_interval_s=0.02, replay_interval_s=0.2).start()
    for i in range(30):
        log.write(row(i))
    assert log.flush()
    assert log.rows_spooled == 30 and log.rows_written == 0
    assert sum(len(p.read_bytes().splitlines()) for p in spool.glob("*.jsonl")) == 30

    db.ensure_database(pg_server, name)
    db.migrate(url)
    log.write(row(30))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and count(url) < 31:
        time.sleep(0.1)
    log.close()
    assert count(url) == 31
    assert not list(spool.glob("*.jsonl"))


def test_a_replayed_file_never_duplicates_rows(db_url, tmp_path):
    spool = tmp_path / "spool"
    first = RequestLog(db_url, spool_dir=spool)
    rows = [copy_row(row(i)) for i in range(5)]
    spool.mkdir()
    first._spool(rows)
    first._spool(rows)  # the same rows twice, as after a replay whose commit was not acknowledged
    log = RequestLog(db_url, spool_dir=spool).start()
    log.close()
    assert count(db_url) == 5
    assert not list(spool.glob("*.jsonl"))


def test_a_row_postgres_refuses_is_kept_aside_and_its_batch_still_lands(db_url, tmp_path):
    spool = tmp_path / "spool"
    log = RequestLog(db_url, spool_dir=spool, flush_interval_s=0.05).start()
    for i in range(10):
        log.write(row(i))
    log.write(row(99, user_id=None))  # violates NOT NULL
    assert log.flush()
    log.close()
    assert count(db_url) == 10
    assert log.rows_rejected == 1
    rejected = list((spool / "rejected").glob("*.jsonl"))
    assert len(rejected) == 1 and b"p99" in rejected[0].read_bytes()
    assert not list(spool.glob("*.jsonl"))
