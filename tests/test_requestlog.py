"""The request log writer against a real Postgres that is there, is not, and comes back."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from tm_gateway.ids import uuid7
from tm_gateway.logrows import copy_row
from tm_gateway.requestlog import RequestLog
from tm_resources import db
from tm_resources.config import EXAMPLE_CONFIG


def row(i: int, **extra) -> dict:
    return {"id": uuid7(), "ts": datetime.now(UTC), "user_id": "u1", "api_format": "openai",
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
    assert log.rows_written == 5  # what /metrics reports as written: each row once
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


# -- what Postgres cannot hold, and files on disk --------------------------------------------------


def test_a_nul_character_still_leaves_a_row_with_the_original_recoverable(gateway):
    import openai

    from tm_gateway.logrows import unescape_nul

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0)
    text = "hi \u0000 there \\0 and a backslash \\"
    answer = client.chat.completions.create(model="local-test", messages=[{"role": "user", "content": text}])
    assert answer.choices[0].message.content == "echo: " + text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="local-test\u0000", messages=[{"role": "user", "content": "x"}])
    rows = gateway.rows()
    assert len(rows) == 2, "every request with a valid key leaves its row"
    answered, refused = rows
    assert answered["nul_escaped"] and "\x00" not in answered["prompt"]
    assert unescape_nul(answered["prompt"]) == text
    assert unescape_nul(answered["response_text"]) == "echo: " + text
    assert unescape_nul(answered["messages"][0]["content"]) == text
    assert refused["status"] == 404 and unescape_nul(refused["requested_model"]) == "local-test\u0000"
    assert not list((gateway.app.state.proxy.request_log.spool_dir / "rejected").glob("*"))


def test_rows_postgres_refuses_go_aside_in_one_private_file_per_batch(db_url, tmp_path):
    import stat

    spool = tmp_path / "spool"
    log = RequestLog(db_url, spool_dir=spool, flush_interval_s=0.05, batch_max_rows=10_000).start()
    for i in range(2000):
        log.write(row(i, user_id=None) if i in (7, 1500) else row(i))  # NOT NULL violated twice
    assert log.flush()
    log.close()
    assert count(db_url) == 1998 and log.rows_rejected == 2
    (rejected,) = (spool / "rejected").glob("*.jsonl")  # one file for the batch, not one per row
    assert b'"p7"' in rejected.read_bytes() and b'"p1500"' in rejected.read_bytes()
    assert stat.S_IMODE(spool.stat().st_mode) == stat.S_IMODE((spool / "rejected").stat().st_mode) == 0o700
    assert stat.S_IMODE(rejected.stat().st_mode) == 0o600


def test_spool_files_are_private_and_the_spool_is_capped(pg_server, tmp_path):
    import stat

    url = db.with_database(pg_server, "t_down_" + uuid.uuid4().hex[:8])  # not there: Postgres "down"
    spool = tmp_path / "spool"
    log = RequestLog(url, spool_dir=spool, flush_interval_s=0.02, spool_max_bytes=4000).start()
    for i in range(5):
        log.write(row(i))
    assert log.flush()
    (first,) = spool.glob("*.jsonl")
    assert stat.S_IMODE(first.stat().st_mode) == 0o600 and stat.S_IMODE(spool.stat().st_mode) == 0o700
    for i in range(200):
        log.write(row(i, prompt="x" * 100))
        if i % 20 == 0:
            assert log.flush()
    assert log.flush()
    log.close()
    on_disk = sum(p.stat().st_size for p in spool.glob("*.jsonl"))
    assert log.rows_dropped > 0 and on_disk < 4000 + 20 * 400
    assert log.rows_spooled + log.rows_dropped == 205


def test_tm_log_replay_rejected_stores_what_it_can_and_keeps_the_rest(db_url, tmp_path, monkeypatch, capsys):
    from tm_gateway.cli import main

    spool = tmp_path / "home" / "spool"
    (spool / "rejected").mkdir(parents=True)
    # As an older version left them: a row with a NUL (storable now), a row missing its user (never).
    good, bad = copy_row(row(1, prompt="a\u0000b")), copy_row(row(2, user_id=None))
    RequestLog(db_url, spool_dir=spool)._reject([good, bad], "test")
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TM_CONFIG", str(EXAMPLE_CONFIG))
    assert main(["log", "replay-rejected"]) == 1
    assert "1 rejected row(s) stored; 1 still refused" in capsys.readouterr().out
    assert count(db_url) == 1
    (kept,) = (spool / "rejected").glob("*.jsonl")
    assert b'"p2"' in kept.read_bytes() and b'"a\\u0000b"' not in kept.read_bytes()
    assert main(["log", "replay-rejected"]) == 1 and count(db_url) == 1  # idempotent


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from datetime import datetime, timezone
from tm_gateway.requestlog import RequestLog
from tm_gateway.ids import uuid7
log = RequestLog(sys.argv[1], spool_dir=Path(sys.argv[2]), flush_interval_s=3600, journal="write").start()
for i in range(int(sys.argv[3])):
    log.write({"id": uuid7(), "ts": datetime.now(timezone.utc), "user_id": "u1", "api_format": "openai",
               "endpoint": "/v1/chat/completions", "status": 200, "prompt": f"p{i}"})
print("written", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("journal, lost", [("write", 0), ("off", 300)])
def test_kill_9_loses_no_queued_row_with_the_journal(db_url, tmp_path, journal, lost):
    import signal
    import subprocess
    import sys

    spool = tmp_path / "spool"
    script = _KILLED_WRITER.replace('journal="write"', f'journal="{journal}"')
    proc = subprocess.Popen([sys.executable, "-c", script, db_url, str(spool), "300"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "written"  # all 300 accepted, none written yet
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    log = RequestLog(db_url, spool_dir=spool, journal=journal).start()  # the next start (or a live worker)
    assert log.flush()
    log.close()
    assert count(db_url) == 300 - lost
    assert not list(spool.glob("*.wal")) and not list(spool.glob("*.jsonl"))


def test_the_journal_is_emptied_as_rows_are_stored(db_url, tmp_path):
    spool = tmp_path / "spool"
    log = RequestLog(db_url, spool_dir=spool, flush_interval_s=0.02, journal="write").start()
    for i in range(50):
        log.write(row(i))
    assert log.flush()
    assert count(db_url) == 50
    assert all(p.stat().st_size == 0 for p in spool.glob("journal-*.wal"))
    log.close()
    assert not list(spool.glob("journal-*.wal")) and count(db_url) == 50


def test_secrets_are_redacted_before_storage_and_pii_is_kept_by_default(gateway):
    import anthropic

    secrets = ["sk-ant-api03-" + "Zx9" * 14, "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8",
               "Tr0ub4dor&3"]
    text = (f"my key {secrets[0]}, aws {secrets[1]}, token {secrets[2]}, password={secrets[3]};"
            " mail me at ann@example.com")
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0)
    answer = client.messages.create(model="claude-test", max_tokens=50, messages=[{"role": "user", "content": text}])
    assert secrets[0] in answer.content[0].text  # the client gets its answer untouched
    (stored,) = gateway.rows()
    for column in (stored["prompt"], stored["response_text"], str(stored["messages"])):
        assert not any(s in column for s in secrets), column
        assert column.count("[SECRET]") == 4 and "ann@example.com" in column


def test_healthz_says_only_ok_without_a_key_and_counts_with_one(gateway):
    import httpx

    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/healthz", headers={"authorization": "Bearer tm-wrong"}).json() == {"status": "ok"}
    counts = httpx.get(gateway.url + "/healthz", headers={"authorization": f"Bearer {gateway.key}"}).json()
    assert set(counts) >= {"rows_written", "rows_spooled", "rows_rejected", "rows_dropped", "rejected_bytes_on_disk"}


def test_a_live_writer_replays_the_journal_of_a_killed_neighbour(db_url, tmp_path):
    # Two workers share a spool folder; one is killed: the other stores its rows without a restart.
    import signal
    import subprocess
    import sys

    spool = tmp_path / "spool"
    live = RequestLog(db_url, spool_dir=spool, flush_interval_s=0.02, replay_interval_s=0.2, journal="write").start()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, db_url, str(spool), "100"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while count(db_url) < 100:
        assert time.monotonic() < deadline, "the live writer did not replay the dead one's journal"
        time.sleep(0.1)
    live.close()
    assert count(db_url) == 100
