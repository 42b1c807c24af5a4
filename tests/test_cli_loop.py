"""`tm loop run` as an operator uses it right after the first traffic: the hour in progress by default,
a clear answer to an hour it cannot run, and a short summary instead of Dagster's log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import log_traffic, write_config
from tests.traffic import an_hour_of_traffic, log_row
from tm_gateway.cli import main


@pytest.fixture
def operator(db_url, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TM_CONFIG", str(write_config(tmp_path)))
    return db_url


@pytest.mark.parametrize("hour, says", [
    ("yesterday", "'yesterday' is not an hour: give 'now'"),
    ("2026-13-45-10:00", "is not an hour"),
    ((datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%d-%H:00"), "has not begun yet"),
    ("2025-06-01-10:00", "before the loop's first hour"),
])
def test_an_hour_the_loop_cannot_run_gets_a_clear_answer(operator, capsys, hour, says):
    assert main(["loop", "run", "--hour", hour]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and "Dagster" not in err


def test_an_empty_hour_says_so_and_names_the_latest_hour_with_requests(operator, tmp_path, capsys):
    earlier = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    log_traffic(operator, tmp_path, [log_row(user="ann", prompt="hi", answer="hello there", model="local-test",
                                             provider="local", ts=earlier + timedelta(minutes=5))])
    assert main(["loop", "run"]) == 0
    out = capsys.readouterr().out
    now_key = datetime.now(UTC).strftime("%Y-%m-%d-%H:00")
    assert f"0 requests in hour {now_key} UTC" in out
    assert f"--hour {earlier:%Y-%m-%d-%H:00}" in out


def test_the_traffic_just_sent_is_scored_and_summarised(operator, tmp_path, capfd):
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    rows = an_hour_of_traffic(hour)
    rejected = log_row(user="ann", prompt="", answer="", model="local-test", provider="local",
                       ts=hour + timedelta(seconds=30), status=400)
    rejected.update(prompt=None, model=None, provider=None, messages=None, input_tokens=0, output_tokens=0)
    log_traffic(operator, tmp_path, [*rows, rejected])

    assert main(["loop", "run"]) == 0
    out, err = capfd.readouterr()
    assert f"scoring {len(rows) + 1} requests of hour {hour:%Y-%m-%d-%H:00} UTC" in out
    assert f"scored {len(rows) + 1} requests" in out and f"{len(rows)} answered and given a quality" in out
    assert "1 not answered" in out
    [types] = [line for line in out.splitlines() if line.startswith("task types: ")]
    assert "coding" in types and "math" in types
    assert "+escalate:math [active]" in out and "+lock_local:coding [active]" in out
    assert "DEBUG" not in out + err and "RuntimeDirWarning" not in out + err  # Dagster's own log only with -v
    # The same hour again, Dagster's own output asked for: nothing moved.
    assert main(["loop", "run", "--hour", "now", "-v"]) == 0
    out, err = capfd.readouterr()
    assert "RUN_SUCCESS" in out + err and "unchanged" in out
