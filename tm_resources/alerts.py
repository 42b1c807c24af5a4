"""Alerts, written once: a row in `alerts` (unique per kind, subject, level and period, so the first
replica to see a crossing records it and the others find it there), a log line, and a PostHog event."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tm_resources.events import EventSink, event_uuid

log = logging.getLogger("tm.alerts")

_INSERT = (
    "INSERT INTO alerts (kind, subject, level, period_start, message, data) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (kind, subject, level, period_start) DO NOTHING RETURNING id"
)


def _announce(sink: EventSink | None, kind: str, subject: str, level: str, period_start: datetime,
              message: str, data: dict[str, Any]) -> None:
    log.warning("alert %s %s %s: %s", kind, subject, level, message)
    if sink is not None:
        sink.capture("tm_alert", distinct_id=subject, event_id=event_uuid("alert", kind, subject, level, period_start),
                     properties={"kind": kind, "subject": subject, "level": level,
                                 "period_start": period_start.isoformat(), "message": message, **data})


def record(conn: psycopg.Connection, *, kind: str, subject: str, level: str, period_start: datetime, message: str,
           data: dict[str, Any] | None = None, sink: EventSink | None = None) -> bool:
    """Record an alert unless this (kind, subject, level, period) already has one; True when this call was first."""
    data = data or {}
    row = conn.execute(_INSERT, (kind, subject, level, period_start, message, Jsonb(data))).fetchone()
    if row is None:
        return False
    _announce(sink, kind, subject, level, period_start, message, data)
    return True


async def record_async(conn: psycopg.AsyncConnection, *, kind: str, subject: str, level: str,
                       period_start: datetime, message: str, data: dict[str, Any] | None = None,
                       sink: EventSink | None = None) -> bool:
    """`record` on an async connection (the gateway's)."""
    data = data or {}
    cur = await conn.execute(_INSERT, (kind, subject, level, period_start, message, Jsonb(data)))
    if await cur.fetchone() is None:
        return False
    _announce(sink, kind, subject, level, period_start, message, data)
    return True
