"""The `tm` command line: keys, migrations, and `tm up` on the embedded default as a user would run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.fakes import free_port
from tm_gateway.cli import main
from tm_resources import db

pytestmark = pytest.mark.slow  # the file takes over 20 s: out of the fast tier


def test_keys_create_list_revoke(db_url, monkeypatch, capsys):
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    assert main(["keys", "create", "--user", "erin"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^(tm-\S+)$", out, re.M).group(1)
    key_id = re.search(r"\(id (k_[0-9a-f]+)\)", out).group(1)

    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "erin" in listing and key not in listing
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT key_hash, prefix FROM api_keys").fetchone()
    assert key.encode() not in bytes(stored[0]) and stored[1] == key[:7]

    assert main(["keys", "revoke", key_id]) == 0
    assert main(["keys", "revoke", key_id]) == 1  # nothing left to revoke
    assert main(["keys", "list"]) == 0
    assert "no keys yet" in capsys.readouterr().out
    assert main(["keys", "list", "--all"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_admin_keys(db_url, monkeypatch, capsys):
    from tm_gateway import keys

    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    assert main(["keys", "create", "--user", "ops", "--admin"]) == 0
    admin_key = re.search(r"^(tm-\S+)$", capsys.readouterr().out, re.M).group(1)
    assert main(["keys", "create", "--user", "erin"]) == 0
    plain_key = re.search(r"^(tm-\S+)$", capsys.readouterr().out, re.M).group(1)
    assert main(["keys", "list"]) == 0
    listing = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert "admin" in listing["ops"] and "admin" not in listing["erin"]
    with psycopg.connect(db_url) as conn:
        assert keys.key_in_force(conn, admin_key).admin is True
        assert keys.key_in_force(conn, plain_key).admin is False
        assert keys.key_in_force(conn, "tm-not-a-key") is None
        keys.revoke(conn, "ops")
        assert keys.key_in_force(conn, admin_key) is None


def test_migrations_run_on_an_existing_database_and_keep_its_rows(db_url, monkeypatch, capsys):
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO requests (id, ts, user_id, api_format, endpoint, status)"
                     " VALUES (gen_random_uuid(), now(), 'u', 'openai', '/v1/chat/completions', 200)")
        conn.commit()
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    assert main(["db", "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
        versions = [v for (v,) in conn.execute("SELECT version FROM tm_schema_migrations ORDER BY 1")]
        assert versions == sorted(versions) and versions[0] == 1
        # Rows land in their month's partition, not the default one.
        part = conn.execute("SELECT tableoid::regclass::text FROM requests").fetchone()[0]
        assert re.fullmatch(r"requests_\d{4}_\d{2}", part)


def test_a_database_of_an_older_version_is_brought_up_to_date_with_its_rows(pg_server):
    url = db.ensure_database(pg_server, "t_old_" + os.urandom(4).hex())
    assert db.migrate(url, up_to=1) == ["0001_requests_and_keys.sql"]
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO requests (id, ts, user_id, api_format, endpoint, status, prompt)"
                     " VALUES (gen_random_uuid(), now(), 'u', 'openai', '/v1/chat/completions', 200, 'kept')")
        conn.commit()
    applied = db.migrate(url)
    assert applied and applied[0] == "0002_loop_tables.sql"
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT prompt, task_type, prompt_embedding FROM requests").fetchall() == [
            ("kept", None, None)]
        assert conn.execute("SELECT to_regclass('routing_rules') IS NOT NULL").fetchone()[0]


DAEMONS = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"


def test_tm_up_starts_on_the_embedded_default_and_says_where_everything_is(tmp_path: Path):
    port, ui_port = free_port(), free_port()
    env = {**os.environ, "TM_HOME": str(tmp_path / "home"), "TM_USER": "founder"}
    env.pop("TM_DATABASE_URL", None)
    env.pop("ANTHROPIC_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_gateway.cli", "up", "--port", str(port), "--ui-port", str(ui_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), signal.signal(signal.SIGTERM, signal.SIG_DFL)),
    )
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200
            except httpx.HTTPError:
                pass
            if ready:
                break
            time.sleep(0.2)
        assert ready, "tm up did not serve /healthz"
        # The Dagster UI (webserver + daemon) comes up beside it, on the same Postgres.
        ui_ready = False
        while time.monotonic() < deadline + 60 and proc.poll() is None and not ui_ready:
            try:
                ui_ready = httpx.get(f"http://127.0.0.1:{ui_port}/server_info", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        assert ui_ready, "the Dagster UI did not come up"
        # dagster-daemon runs beside the webserver: the UI reports the daemons that run the hourly
        # automation and backfills as healthy (their heartbeats come from that process alone).
        daemons: dict = {}
        while time.monotonic() < deadline + 180 and not (daemons.get("SENSOR") and daemons.get("BACKFILL")):
            time.sleep(2)
            got = httpx.post(f"http://127.0.0.1:{ui_port}/graphql", timeout=5, json={"query": DAEMONS}).json()
            daemons = {d["daemonType"]: d["healthy"]
                       for d in got["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]}
        assert daemons.get("SENSOR") and daemons.get("BACKFILL"), daemons
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"http://127.0.0.1:{port}" in out
    assert f"loop UI   http://127.0.0.1:{ui_port}" in out
    key = re.search(r"^\s+(tm-\S+)$", out, re.M).group(1)
    assert "for user 'founder'" in out
    assert "no API key: export ANTHROPIC_API_KEY" in out
    assert "No provider is reachable yet" in out
    assert "XDG_RUNTIME_DIR" not in out  # platformdirs' warning on a headless machine is not the operator's
    assert proc.returncode in (0, -signal.SIGINT)
    with pytest.raises(httpx.HTTPError):  # the webserver stopped with it
        httpx.get(f"http://127.0.0.1:{ui_port}/server_info", timeout=1)
    # The key it printed is the one stored, hashed, in the embedded database it started.
    url = db.start_embedded(tmp_path / "home")
    from tm_gateway.keys import hash_key
    with psycopg.connect(url) as conn:
        # ... an admin key: whoever starts the install can open the dashboard's team pages with it.
        assert conn.execute("SELECT user_id, admin FROM api_keys WHERE key_hash = %s", (hash_key(key),)
                            ).fetchone() == ("founder", True)


def test_a_port_in_use_is_reported_before_the_banner_and_before_any_key_is_made(tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TM_DATABASE_URL", raising=False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["up", "--no-loop", "--host", "127.0.0.1", "--port", str(port)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and f"port {port} on 127.0.0.1 is in use" in err
        assert main(["gateway", "--host", "127.0.0.1", "--port", str(port)]) == 1
        assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
        free = free_port()
        assert main(["up", "--host", "127.0.0.1", "--port", str(free), "--ui-port", str(port)]) == 1
        assert "loop UI" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # no database started, so no key shown once and lost


def test_gateway_with_an_invalid_config_exits_non_zero(tmp_path, capsys):
    bad = tmp_path / "tm.yaml"
    bad.write_text("gateway:\n  port: eighty\n")
    assert main(["gateway", "--config", str(bad)]) == 2
    assert "gateway.port" in capsys.readouterr().err


def test_bench_router_on_a_missing_folder_exits_non_zero(tmp_path, capsys):
    assert main(["bench", "router", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_tm_requests_shows_recent_rows_with_filters_and_json(db_url, tmp_path, monkeypatch, capsys):
    import json
    from datetime import datetime, timedelta

    from tests.support import log_traffic
    from tests.traffic import log_row

    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    assert main(["requests"]) == 0
    assert "no requests logged yet" in capsys.readouterr().out
    t = datetime.now(UTC) - timedelta(minutes=5)
    rows = [log_row(user="ann", prompt="What is 2+2?", answer="4", model="local-test", provider="local", ts=t),
            log_row(user="bob", prompt="Write a haiku\nabout rain", answer="Rain...", model="claude-test",
                    provider="anthropic", ts=t + timedelta(seconds=1)),
            log_row(user="bob", prompt="", answer="", model="local-test", provider="local",
                    ts=t + timedelta(seconds=2), status=404)]
    log_traffic(db_url, tmp_path, rows)

    assert main(["requests"]) == 0
    out = capsys.readouterr().out
    assert out.index("What is 2+2?") < out.index("Write a haiku about rain")  # oldest first, one line each
    assert main(["requests", "--user", "bob", "--status", "4xx"]) == 0
    out = capsys.readouterr().out
    assert "404" in out and "haiku" not in out and "ann" not in out
    assert main(["requests", "--model", "claude-test", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    got = json.loads(line)
    assert got["user_id"] == "bob" and got["prompt"] == "Write a haiku\nabout rain" and got["status"] == 200
    assert main(["requests", "-n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == 404
    assert main(["requests", "--status", "four"]) == 2
    assert "give a code (404)" in capsys.readouterr().err


def test_tm_grades_shows_the_counts_behind_the_wrong_model_rate(db_url, monkeypatch, capsys):
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO grades (hour, user_id, grade, avg_quality_score, samples, requests_today,"
                     " tokens_today, cost_today, escalations, wrong_model_rate) VALUES"
                     " (date_trunc('hour', now()), 'ann', 'B', 0.8, 12, 20, 900, 0.01, 5, 1.0),"
                     " (date_trunc('hour', now()), 'bob', 'C', 0.6, 8, 8, 300, 0.0, 0, NULL)")
    assert main(["grades"]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 (100%)" in out
    assert "local answer had scored above 0.8" in out


def _line(proc: subprocess.Popen, timeout: float = 30) -> str:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no line in time"
    return proc.stdout.readline()


def test_tm_requests_follow_prints_new_rows_as_they_are_logged(db_url, tmp_path):
    from datetime import datetime

    from tests.support import log_traffic
    from tests.traffic import log_row

    env = {**os.environ, "TM_DATABASE_URL": db_url, "TM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "tm_gateway.cli", "requests", "--follow", "--json",
                             "--interval", "0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        log_traffic(db_url, tmp_path, [log_row(user="cy", prompt="first one", answer="ok", model="local-test",
                                               provider="local", ts=datetime.now(UTC))])
        assert '"prompt": "first one"' in _line(proc)
        log_traffic(db_url, tmp_path, [log_row(user="cy", prompt="second one", answer="ok", model="local-test",
                                               provider="local", ts=datetime.now(UTC))])
        assert '"prompt": "second one"' in _line(proc)
    finally:
        proc.terminate()
        proc.wait(10)


def test_worker_processes_keep_the_gateways_info_logs(db_url, upstreams, tmp_path: Path):
    # With --workers N each worker is a fresh process: its spool replays and key or rule reloads
    # must still reach the operator's log.
    import yaml

    from tests.conftest import make_config
    from tm_gateway import keys

    anthropic, local = upstreams
    config = make_config(anthropic.url, local.openai_url, gateway={"classify_auto": False, "refresh_interval_s": 0.2})
    cfg = tmp_path / "tm.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    port = free_port()
    env = {**os.environ, "TM_DATABASE_URL": db_url, "TM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_gateway.cli", "gateway", "--config", str(cfg), "--port", str(port),
         "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL),
                            signal.signal(signal.SIGTERM, signal.SIG_DFL)),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1)  # both workers up
        with psycopg.connect(db_url) as conn:
            keys.create_key(conn, "newcomer")
        time.sleep(2)  # a few state polls
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reloads = re.findall(r"INFO tm_gateway\.state: api keys reloaded", out)
    assert len(reloads) == 2, out  # one line from each worker
