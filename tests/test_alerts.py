"""Alerts: one per kind, subject, level and period however many times (or replicas) see the crossing,
with a PostHog event through the official SDK for the first only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg

from tests.conftest import query
from tests.fakes import FakePostHog
from tm_resources import alerts
from tm_resources.events import EventSink

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)


def test_an_alert_is_recorded_once_per_level_and_period(db_url: str) -> None:
    with FakePostHog() as ph:
        sink = EventSink("phc_test", ph.url, sync=True)
        with psycopg.connect(db_url, autocommit=True) as conn:
            first = alerts.record(conn, kind="budget", subject="team:design:month", level="0.75",
                                  period_start=PERIOD, message="team design used 75% of its monthly budget",
                                  data={"spent_usd": 75.0}, sink=sink)
            again = alerts.record(conn, kind="budget", subject="team:design:month", level="0.75",
                                  period_start=PERIOD, message="team design used 75% of its monthly budget",
                                  sink=sink)
            next_level = alerts.record(conn, kind="budget", subject="team:design:month", level="0.9",
                                       period_start=PERIOD, message="90%", sink=sink)
            next_period = alerts.record(conn, kind="budget", subject="team:design:month", level="0.75",
                                        period_start=datetime(2026, 12, 1, tzinfo=UTC), message="75%", sink=sink)
        sink.close()
        events = ph.wait_for(3)
    assert (first, again, next_level, next_period) == (True, False, True, True)
    rows = query(db_url, "SELECT level, period_start, data FROM alerts ORDER BY id")
    assert [r["level"] for r in rows] == ["0.75", "0.9", "0.75"]
    assert rows[0]["data"] == {"spent_usd": 75.0}
    assert [e["event"] for e in events] == ["tm_alert"] * 3
    assert events[0]["properties"]["subject"] == "team:design:month"


def test_concurrent_replicas_record_one_alert(db_url: str) -> None:

    async def one() -> bool:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            return await alerts.record_async(conn, kind="quota", subject="provider:anthropic", level="critical",
                                             period_start=PERIOD, message="anthropic is at 96% of its quota")

    async def many() -> list[bool]:
        return await asyncio.gather(*(one() for _ in range(8)))

    assert sorted(asyncio.run(many())) == [False] * 7 + [True]
    assert len(query(db_url, "SELECT * FROM alerts")) == 1
