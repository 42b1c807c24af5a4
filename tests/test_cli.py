"""The `tm` command line: keys, migrations, and `tm up` on the embedded default as a user would run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.fakes import free_port
from tm_gateway.cli import main
from tm_resources import db


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
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"http://127.0.0.1:{port}" in out
    assert f"loop UI   http://127.0.0.1:{ui_port}" in out
    key = re.search(r"^\s+(tm-\S+)$", out, re.M).group(1)
    assert "for user 'founder'" in out
    assert "no API key: export ANTHROPIC_API_KEY" in out
    assert "No provider is reachable yet" in out
    assert proc.returncode in (0, -signal.SIGINT)
    # The key it printed is the one stored, hashed, in the embedded database it started.
    url = db.start_embedded(tmp_path / "home")
    from tm_resources.keys import hash_key
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT user_id FROM api_keys WHERE key_hash = %s", (hash_key(key),)).fetchone() == (
            "founder",)


def test_worker_processes_keep_the_gateways_info_logs(db_url, upstreams, tmp_path: Path):
    # With --workers N each worker is a fresh process: its spool replays and key or rule reloads
    # must still reach the operator's log.
    import yaml

    from tests.conftest import make_config
    from tm_resources import keys

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
