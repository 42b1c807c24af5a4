"""One hour of the provider_quotas table: every provider's quota as of the hour's end (or now, for the hour
in progress), and an alert for each provider whose state moved since the previous hour's row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import psycopg

from tm_resources import quotas
from tm_resources.config import Config
from tm_resources.events import EventSink

QUOTA_COLUMNS = ["provider", "source", "quota_type", "used", "quota_limit", "used_fraction", "rate_per_h",
                 "window_start", "reset_at", "exhausts_at", "exhausts_early", "exhausts_late", "state", "summary",
                 "forecast"]


def _after(now: datetime, hours: float | None) -> datetime | None:
    return None if hours is None else now + timedelta(hours=hours)


def provider_quotas_hour(conn: psycopg.Connection, config: Config, hour: datetime, sink: EventSink | None = None,
                         now: datetime | None = None) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """(the hour's rows, the forecasts for the run's metadata, the providers whose state moved)."""
    as_of = min(hour + timedelta(hours=1), now or datetime.now(UTC))
    found = quotas.status(conn, config, as_of)
    previous: dict[str, str] = dict(conn.execute(
        "SELECT provider, state FROM provider_quotas WHERE hour = (SELECT max(hour) FROM provider_quotas"
        " WHERE hour < %s)", (hour,)).fetchall())
    moved = quotas.record_state_changes(conn, found, previous, sink)
    rows, forecasts = [], []
    for s in found:
        fc = {"as_of": as_of.isoformat(), "shape": s.shape, "rate_per_h": s.rate_per_h,
              "exhausts_in_h": s.exhausts_in_h, "interval_h": [s.exhausts_early_h, s.exhausts_late_h],
              "exhausts_before_reset": s.exhausts_before_reset, "error": s.error}
        rows.append({"provider": s.provider, "source": s.source, "quota_type": s.type, "used": s.used or 0.0,
                     "quota_limit": s.limit, "used_fraction": s.used_fraction, "rate_per_h": s.rate_per_h,
                     "window_start": s.window_start, "reset_at": s.reset_at, "exhausts_at": s.exhausts_at,
                     "exhausts_early": _after(as_of, s.exhausts_early_h),
                     "exhausts_late": _after(as_of, s.exhausts_late_h),
                     "state": s.state, "summary": s.summary, "forecast": fc})
        forecasts.append({"provider": s.provider, "state": s.state, "summary": s.summary, **fc})
    return pd.DataFrame(rows, columns=QUOTA_COLUMNS), forecasts, moved
