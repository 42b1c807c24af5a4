"""The grades asset's PostHog events: one `tm_grade` per user and hour, so PostHog can chart each person's
grade and quality next to their `$ai_generation` events (no prompt text: the coaching example stays out)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pandas as pd

from tm_resources.events import EventSink, event_uuid

SENT_COLUMNS = ("grade", "avg_quality_score", "samples", "requests_today", "tokens_today", "cost_today",
                "escalations", "wrong_model_rate", "prompt_quality_avg", "low_prompt_days")


def _plain(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def send_grade_events(sink: EventSink, grades: pd.DataFrame, hour: datetime) -> int:
    """One event per user's grade; ids derive from the hour and the user, so a re-run hour is not counted twice."""
    if not sink.enabled:
        return 0
    for g in grades.to_dict("records"):
        sink.capture("tm_grade", distinct_id=g["user_id"], event_id=event_uuid("grade", hour.isoformat(), g["user_id"]),
                     timestamp=hour + timedelta(hours=1),
                     properties={"hour": hour.isoformat(), **{c: _plain(g.get(c)) for c in SENT_COLUMNS}})
    return len(grades)
