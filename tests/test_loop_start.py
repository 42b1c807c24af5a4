"""Where the loop's hourly partitions begin: what a new installation's Dagster UI offers to run and
backfill, and which hours `tm loop run` accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.conftest import make_config
from tests.support import log_traffic
from tests.traffic import log_row
from tm_gateway.cli import main
from tm_resources.loop_start import FALLBACK, first_hour

NOW = datetime(2026, 11, 30, 13, 40, tzinfo=UTC)


def test_a_new_installation_starts_at_the_hour_in_progress(db_url):
    assert first_hour(None, db_url, now=NOW) == datetime(2026, 11, 30, 13, tzinfo=UTC)


def test_the_first_logged_request_sets_the_first_hour(db_url, tmp_path):
    first = NOW - timedelta(days=2, minutes=15)
    log_traffic(db_url, tmp_path, [log_row(user="ann", prompt="hi", answer="hello", model="local-test",
                                           provider="local", ts=t) for t in (first, NOW - timedelta(hours=1))])
    assert first_hour(None, db_url, now=NOW) == datetime(2026, 11, 28, 13, tzinfo=UTC)


def test_loop_start_in_the_configuration_wins(db_url):
    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", loop={"start": "2026-11-01T08:30:00+02:00"})
    assert first_hour(config, db_url, now=NOW) == datetime(2026, 11, 1, 6, tzinfo=UTC)


def test_no_reachable_database_falls_back_to_a_week_of_hours():
    unreachable = "postgresql://tm@127.0.0.1:9/tm"
    assert first_hour(None, unreachable, now=NOW) == datetime(2026, 11, 30, 13, tzinfo=UTC) - FALLBACK
    assert first_hour(None, None, now=NOW) == datetime(2026, 11, 30, 13, tzinfo=UTC) - FALLBACK


def test_tm_loop_run_names_the_first_hour_when_asked_for_an_earlier_one(db_url, tmp_path, monkeypatch, capsys):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    log_traffic(db_url, tmp_path, [log_row(user="ann", prompt="hi", answer="hello", model="local-test",
                                           provider="local", ts=hour + timedelta(minutes=5))])
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    earlier = hour - timedelta(hours=1)
    assert main(["loop", "run", "--hour", earlier.strftime("%Y-%m-%d-%H:%M")]) == 2
    assert f"before the loop's first hour, {hour:%Y-%m-%d-%H:%M}" in capsys.readouterr().err
