"""Where the loop's hourly partitions begin: read once by the Dagster definitions and by `tm loop run`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import psycopg

from tm_resources.config import Config
from tm_resources.db import one

log = logging.getLogger(__name__)

# Without a database to ask (none named, or unreachable when the definitions load), a week back: a new
# installation's UI shows a week of hours, not every hour since some fixed date, and a recent hour can
# still be scored or backfilled.
FALLBACK = timedelta(days=7)


def floor_hour(t: datetime) -> datetime:
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def first_hour(config: Config | None, url: str | None, now: datetime | None = None) -> datetime:
    """`loop.start` when configured; else the hour of the first logged request; else, with an empty log,
    the hour in progress (the installation starts now); else (no database reachable) a week back."""
    now = floor_hour(now or datetime.now(UTC))
    if config is not None and config.loop.start is not None:
        return floor_hour(config.loop.start)
    if url:
        try:
            # Short: the definitions load on every code-server start and must not hang on a dead host.
            with psycopg.connect(url, connect_timeout=3) as conn:
                first = one(conn.execute("SELECT min(ts) FROM requests"))[0]
            return floor_hour(first) if first is not None else now
        except psycopg.Error as err:
            log.warning("cannot read the first request's hour (%s); the loop's hours start %s days back",
                        type(err).__name__, FALLBACK.days)
    return now - FALLBACK
