"""When a quota runs out: a team's hourly usage as a seasonal shape (hour of day, or hour of week) times its
recent level, with an interval read from the model's own past errors on the same traffic.

Explainable on purpose: the expected usage of a future hour is `level x profile[that hour]`, where
`profile` is the team's usual share of an hour (mean 1; flat without enough history) and `level` is
the last `lookback_h` hours' usage divided by what the profile expected of them. The interval comes
from replaying the same forecast at earlier points of the history (how far off it was, 10th-90th
percentile, at a similar horizon); with too little history, from the spread of the recent hours.
bench/quota_forecast.py measures it on synthetic traffic with a working-week shape
(docs/benchmarks.md, "Quota forecasts").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

HOUR = timedelta(hours=1)
# A day-of-week shape needs two of each weekday; an hour-of-day shape, three days.
WEEKLY_MIN_H = 14 * 24
DAILY_MIN_H = 3 * 24
# The interval's percentiles, and how many past replays it needs before trusting them.
LOW_Q, HIGH_Q = 10, 90
MIN_REPLAYS = 8
Z_80 = 1.2816


@dataclass(frozen=True)
class RateModel:
    """A fitted model of one quota's hourly usage, in local time of `tz`."""

    now: datetime
    tz: str
    shape: str                       # "flat" | "hour-of-day" | "hour-of-week"
    profile: np.ndarray              # 1, 24 or 168 shares, mean 1
    level: float                     # usage per hour of share 1
    history_h: int
    _history: np.ndarray = field(repr=False)
    _starts: pd.DatetimeIndex = field(repr=False)
    lookback_h: int = 24

    @property
    def rate_per_h(self) -> float:
        """The usage per hour expected over the next 24 hours, on average."""
        return float(self.expected(24).mean())

    def _slots(self, starts: pd.DatetimeIndex) -> np.ndarray:
        local = starts.tz_convert(self.tz)
        if self.shape == "hour-of-week":
            return np.asarray(local.dayofweek * 24 + local.hour)
        if self.shape == "hour-of-day":
            return np.asarray(local.hour)
        return np.zeros(len(starts), dtype=int)

    def expected(self, hours: int, level: float | None = None) -> np.ndarray:
        """Expected usage of each of the next `hours` hours from now."""
        starts = pd.date_range(self.now, periods=hours, freq="h")
        return (self.level if level is None else level) * self.profile[self._slots(starts)]

    def hours_until(self, amount: float, max_h: int, scale: float = 1.0) -> float | None:
        """Hours from now until `amount` more has been used at `scale` x the expected rate; None: not within max_h."""
        if amount <= 0:
            return 0.0
        per_hour = self.expected(max_h) * scale
        total = np.cumsum(per_hour)
        i = int(np.searchsorted(total, amount))
        if i >= max_h or per_hour[i] <= 0:
            return None
        before = total[i - 1] if i else 0.0
        return i + (amount - before) / per_hour[i]

    def spread(self, horizon_h: float) -> tuple[float, float]:
        """(low, high) multipliers of the expected usage over the next `horizon_h` hours: 10th and 90th
        percentile of actual / forecast when the model is replayed on this history."""
        h = int(min(max(round(horizon_h), 1), 72))
        ratios = _replay_ratios(self._history, self._starts, self.tz, h, self.lookback_h)
        if len(ratios) >= MIN_REPLAYS:
            low, high = np.percentile(ratios, [LOW_Q, HIGH_Q])
            return float(max(low, 0.05)), float(max(high, low + 1e-6))
        # Too few replays: the level's own standard error from the recent hours' spread (hours treated as independent).
        recent = self._history[-self.lookback_h:]
        expect = self.profile[self._slots(self._starts[-self.lookback_h:])]
        mean = float(recent.sum() / max(expect.sum(), 1e-9))
        if mean <= 0 or len(recent) < 2:
            return 0.5, 2.0
        rel = float(np.std(recent / np.maximum(expect, 1e-9), ddof=1) / mean / math.sqrt(len(recent)))
        rel = min(max(rel, 0.05), 0.9)
        return 1 - Z_80 * rel if 1 - Z_80 * rel > 0.05 else 0.05, 1 + Z_80 * rel


def fit(usage: np.ndarray, starts: pd.DatetimeIndex, now: datetime, tz: str = "UTC",
        lookback_h: int = 24) -> RateModel:
    """Fit on hourly usage whose bins start at `starts` (UTC, one hour apart, the last ending at `now`)."""
    usage = np.asarray(usage, dtype="float64")
    nonzero = np.flatnonzero(usage > 0)
    history_h = int(len(usage) - nonzero[0]) if len(nonzero) else 0
    shape = "hour-of-week" if history_h >= WEEKLY_MIN_H else "hour-of-day" if history_h >= DAILY_MIN_H else "flat"
    used = usage[len(usage) - history_h:] if history_h else usage[:0]
    used_starts = starts[len(usage) - history_h:] if history_h else starts[:0]
    profile = _profile(used, used_starts.tz_convert(tz), shape)
    probe = RateModel(now, tz, shape, profile, 0.0, history_h, used, used_starts, lookback_h)
    level = _level(used, profile[probe._slots(used_starts)], lookback_h)
    return RateModel(now, tz, shape, profile, level, history_h, used, used_starts, lookback_h)


def _profile(usage: np.ndarray, local: pd.DatetimeIndex, shape: str) -> np.ndarray:
    """Each slot's usual usage as a share of the mean hour. A slot is shrunk by one pseudo-hour towards the
    level above it (hour of week -> hour of day -> the mean hour), so a slot seen a few times is not
    trusted as zero, and a quiet night stays quiet."""
    n = {"flat": 1, "hour-of-day": 24, "hour-of-week": 168}[shape]
    if n == 1 or not len(usage) or usage.sum() <= 0:
        return np.ones(n)
    mean = usage.mean()
    hours = np.asarray(local.hour)
    daily = _shrunk(usage, hours, 24, np.full(24, mean))
    if shape == "hour-of-day":
        shares = daily
    else:
        weekly = np.asarray(local.dayofweek) * 24 + hours
        shares = _shrunk(usage, weekly, 168, np.tile(daily, 7))
    shares = shares / mean
    return shares / shares.mean()


def _shrunk(usage: np.ndarray, slots: np.ndarray, n: int, prior: np.ndarray) -> np.ndarray:
    sums = np.bincount(slots, weights=usage, minlength=n)
    counts = np.bincount(slots, minlength=n)
    return (sums + prior) / (counts + 1)


def _level(usage: np.ndarray, expect: np.ndarray, lookback_h: int) -> float:
    recent, shares = usage[-lookback_h:], expect[-lookback_h:]
    return float(recent.sum() / shares.sum()) if len(recent) and shares.sum() > 0 else 0.0


def _replay_ratios(usage: np.ndarray, starts: pd.DatetimeIndex, tz: str, horizon_h: int, lookback_h: int,
                   step_h: int = 3) -> np.ndarray:
    """actual / forecast usage over `horizon_h` hours, the model fitted at earlier points of the history."""
    out = []
    first = max(lookback_h, DAILY_MIN_H)
    for cut in range(first, len(usage) - horizon_h + 1, step_h):
        model = fit(usage[:cut], starts[:cut], starts[cut].to_pydatetime(), tz, lookback_h)
        want = model.expected(horizon_h).sum()
        got = usage[cut:cut + horizon_h].sum()
        if want > 0:
            out.append(got / want)
    return np.asarray(out)


@dataclass(frozen=True)
class Exhaustion:
    hours: float | None              # None: not within the horizon at this rate
    early: float | None              # the interval: usage faster than expected ...
    late: float | None               # ... and slower
    at: datetime | None
    early_at: datetime | None
    late_at: datetime | None


def exhaustion(model: RateModel, remaining: float, max_h: int) -> Exhaustion:
    """When `remaining` more usage is reached, with the interval of the model's own past errors."""
    point = model.hours_until(remaining, max_h)
    low, high = model.spread(point if point is not None else 24)
    early = model.hours_until(remaining, max_h, scale=high)
    late = model.hours_until(remaining, max_h, scale=low)

    def at(h: float | None) -> datetime | None:
        return None if h is None else model.now + timedelta(hours=h)

    return Exhaustion(point, early, late, at(point), at(early), at(late))
