"""Rows that reach Postgres late are counted once: a killed process's journal by the gateway that replays it
(in /metrics and as PostHog events), rows a live gateway spooled while Postgres was down only when spooled."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import openai
import orjson
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_config, query, start_gateway
from tests.fakes import FakePostHog
from tests.test_metrics import scrape, total
from tm_gateway import keys
from tm_gateway.metrics import GatewayMetrics
from tm_gateway.requestlog import RequestLog
from tm_resources import db

# A gateway process that accepted rows (journaled, still queued: its writer waits an hour) and is then killed.
_KILLED_GATEWAY = """
import sys, time
from pathlib import Path
from datetime import datetime, timezone
from tm_gateway.requestlog import RequestLog
from tm_gateway.ids import uuid7
log = RequestLog(sys.argv[1], spool_dir=Path(sys.argv[2]), flush_interval_s=3600, journal="write").start()
for i in range(int(sys.argv[3])):
    log.write({"id": uuid7(), "ts": datetime.now(timezone.utc), "user_id": "alice", "api_format": "openai",
               "endpoint": "/v1/chat/completions", "model": "local-test", "provider": "local", "status": 200,
               "input_tokens": 7, "output_tokens": 3, "latency_ms": 12.0, "prompt": f"question {i}"})
print("written", flush=True)
time.sleep(3600)
"""


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _count(url: str) -> int:
    return query(url, "SELECT count(*) AS n FROM requests")[0]["n"]


def test_a_killed_process_journal_is_counted_once_by_the_gateway_that_replays_it(db_url, upstreams, tmp_path,
                                                                                monkeypatch):
    anth, local = upstreams
    spool = tmp_path / "spool"  # the gateway's own ($TM_HOME/spool), shared with the killed process
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_GATEWAY, db_url, str(spool), "30"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # The dead process had stored (and counted) its first 10 rows, but not yet ended its journal segment:
    # those 10 are in the journal and in Postgres.
    (journal,) = spool.glob("journal-*.wal")
    lines = journal.read_bytes().splitlines()
    assert len(lines) == 30
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "1-1.jsonl").write_bytes(b"\n".join(lines[:10]) + b"\n")
    RequestLog(db_url, spool_dir=earlier).start().close()
    assert _count(db_url) == 10
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")

    with FakePostHog() as posthog:
        monkeypatch.setenv("POSTHOG_API_KEY", "phc_test_project")
        monkeypatch.setenv("POSTHOG_HOST", posthog.url)
        app, server = start_gateway(make_config(anth.url, local.openai_url, gateway={"classify_auto": False}),
                                    db_url, tmp_path)
        try:
            _wait(lambda: _count(db_url) == 30, 15, "the journal's replay")
            request_log = app.state.proxy.request_log
            assert request_log.flush()
            m = scrape(server.url)
            assert total(m["tm_requests"], "tm_requests_total", model="local-test", status="200") == 20
            assert total(m["tm_tokens"], "tm_tokens_total", direction="input") == 20 * 7
            assert total(m["tm_request_duration_seconds"], "tm_request_duration_seconds_count") == 20
            assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="written") == 20
            # The gateway's own traffic is counted as before, and the replay is not counted again.
            oa = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            oa.chat.completions.create(model="local-test", messages=[{"role": "user", "content": "hello"}])
            assert request_log.flush()
            m = scrape(server.url)
            assert total(m["tm_requests"], "tm_requests_total", model="local-test", status="200") == 21
            assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="written") == 21
        finally:
            server.stop()  # sends what the PostHog SDK still holds
        sent = [e for e in posthog.events if e["event"] == "$ai_generation"]
    assert not list(spool.glob("journal-*"))
    replayed = {str(r["id"]) for r in query(db_url, "SELECT id FROM requests WHERE prompt LIKE 'question %%'")}
    stored_before = {orjson.loads(line)[0] for line in lines[:10]}
    assert len(replayed) == 30 and stored_before < replayed
    assert len(sent) == 21  # one event per row, each once
    assert {e["uuid"] for e in sent} >= replayed - stored_before
    assert not {e["uuid"] for e in sent} & stored_before


def test_rows_spooled_while_postgres_was_down_are_not_counted_again_when_it_returns(pg_server, tmp_path: Path):
    name = "t_back_" + uuid.uuid4().hex[:8]
    url = db.with_database(pg_server, name)  # no such database yet: every connection fails
    request_log = RequestLog(url, spool_dir=tmp_path / "spool", flush_interval_s=0.01, replay_interval_s=0.1)
    metrics = GatewayMetrics(SimpleNamespace(request_log=request_log, shared=SimpleNamespace(rules=[])))
    request_log.observers.append(metrics.observe)
    request_log.start()
    try:
        for _ in range(3):
            request_log.write({"id": uuid.uuid4(), "ts": datetime.now(UTC), "user_id": "alice", "api_format": "openai",
                               "endpoint": "/v1/chat/completions", "model": "local-test", "provider": "local",
                               "status": 200, "latency_ms": 5.0, "input_tokens": 7})
        assert request_log.flush() and request_log.rows_spooled == 3
        db.ensure_database(pg_server, name)
        db.migrate(url)
        _wait(lambda: request_log.spooled_on_disk() == 0, 15, "the spool's replay")
        assert request_log.flush()
        m = {f.name: f.samples for f in text_string_to_metric_families(metrics.exposition().decode())}
    finally:
        request_log.close()
    assert _count(url) == 3
    assert total(m["tm_requests"], "tm_requests_total", model="local-test", status="200") == 3
    assert total(m["tm_tokens"], "tm_tokens_total", direction="input") == 3 * 7
    # Spooled, then written: what became of each row, not a second request.
    assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="spooled") == 3
    assert total(m["tm_log_rows"], "tm_log_rows_total", outcome="written") == 3

