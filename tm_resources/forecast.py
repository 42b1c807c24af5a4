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


SIZES = {"flat": 1, "hour-of-day": 24, "hour-of-week": 168}


def slots(starts: pd.DatetimeIndex, tz: str, shape: str) -> np.ndarray:
    """Each hour's slot in a profile of `shape`, in local time of `tz`."""
    if shape == "flat":
        return np.zeros(len(starts), dtype=int)
    local = starts.tz_convert(tz)
    hours = np.asarray(local.hour)
    return np.asarray(local.day_of_week) * 24 + hours if shape == "hour-of-week" else hours


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

    def expected(self, hours: int, level: float | None = None) -> np.ndarray:
        """Expected usage of each of the next `hours` hours from now."""
        starts = pd.date_range(self.now, periods=hours, freq="h")
        return (self.level if level is None else level) * self.profile[slots(starts, self.tz, self.shape)]

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
        return float(i + (amount - before) / per_hour[i])

    def spread(self, horizon_h: float) -> tuple[float, float]:
        """(low, high) multipliers of the expected usage over the next `horizon_h` hours: 10th and 90th
        percentile of actual / forecast when this model (same shape and lookback) is replayed on this history."""
        h = int(min(max(round(horizon_h), 1), 72))
        ratios = _replay_ratios(self._history, self._starts, self.tz, self.shape, h, self.lookback_h)
        if len(ratios) >= MIN_REPLAYS:
            low, high = np.percentile(ratios, [LOW_Q, HIGH_Q])
            return float(max(low, 0.05)), float(max(high, low + 1e-6))
        # Too few replays: the level's own standard error from the recent hours' spread (hours treated as independent).
        recent = self._history[-self.lookback_h:]
        expect = self.profile[slots(self._starts[-self.lookback_h:], self.tz, self.shape)]
        mean = float(recent.sum() / max(expect.sum(), 1e-9))
        if mean <= 0 or len(recent) < 2:
            return 0.5, 2.0
        rel = float(np.std(recent / np.maximum(expect, 1e-9), ddof=1) / mean / math.sqrt(len(recent)))
        rel = min(max(rel, 0.05), 0.9)
        return max(1 - Z_80 * rel, 0.05), 1 + Z_80 * rel


def shape_for(history_h: int) -> str:
    return "hour-of-week" if history_h >= WEEKLY_MIN_H else "hour-of-day" if history_h >= DAILY_MIN_H else "flat"


def fit(usage: np.ndarray, starts: pd.DatetimeIndex, now: datetime, tz: str = "UTC",
        lookback_h: int = 24) -> RateModel:
    """Fit on hourly usage whose bins start at `starts` (UTC, one hour apart, the last ending at `now`)."""
    usage = np.asarray(usage, dtype="float64")
    nonzero = np.flatnonzero(usage > 0)
    history_h = int(len(usage) - nonzero[0]) if len(nonzero) else 0
    shape = shape_for(history_h)
    used = usage[len(usage) - history_h:] if history_h else usage[:0]
    used_starts = starts[len(usage) - history_h:] if history_h else starts[:0]
    profile, level = _fit_arrays(used, _slot_pair(used_starts, tz), shape, lookback_h)
    return RateModel(now, tz, shape, profile, level, history_h, used, used_starts, lookback_h)


def _slot_pair(starts: pd.DatetimeIndex, tz: str) -> tuple[np.ndarray, np.ndarray]:
    """(hour of day, hour of week) of each bin, in local time."""
    return slots(starts, tz, "hour-of-day"), slots(starts, tz, "hour-of-week")


def _fit_arrays(usage: np.ndarray, pair: tuple[np.ndarray, np.ndarray], shape: str,
                lookback_h: int) -> tuple[np.ndarray, float]:
    profile = _profile(usage, pair, shape)
    own = pair[1] if shape == "hour-of-week" else pair[0] if shape == "hour-of-day" else np.zeros(len(usage), int)
    return profile, _level(usage, profile[own], lookback_h)


def _profile(usage: np.ndarray, pair: tuple[np.ndarray, np.ndarray], shape: str) -> np.ndarray:
    """Each slot's usual usage as a share of the mean hour. A slot is shrunk by one pseudo-hour towards the
    level above it (hour of week -> hour of day -> the mean hour), so a slot seen a few times is not
    trusted as zero, and a quiet night stays quiet."""
    n = SIZES[shape]
    if n == 1 or not len(usage) or usage.sum() <= 0:
        return np.ones(n)
    mean = usage.mean()
    daily = _shrunk(usage, pair[0], 24, np.full(24, mean))
    shares = daily if shape == "hour-of-day" else _shrunk(usage, pair[1], 168, np.tile(daily, 7))
    shares = shares / mean
    return shares / shares.mean()


def _shrunk(usage: np.ndarray, slot: np.ndarray, n: int, prior: np.ndarray) -> np.ndarray:
    sums = np.bincount(slot, weights=usage, minlength=n)
    counts = np.bincount(slot, minlength=n)
    return (sums + prior) / (counts + 1)


def _level(usage: np.ndarray, expect: np.ndarray, lookback_h: int) -> float:
    recent, shares = usage[-lookback_h:], expect[-lookback_h:]
    return float(recent.sum() / shares.sum()) if len(recent) and shares.sum() > 0 else 0.0


def _replay_ratios(usage: np.ndarray, starts: pd.DatetimeIndex, tz: str, shape: str, horizon_h: int,
                   lookback_h: int, step_h: int = 3) -> np.ndarray:
    """actual / forecast usage over `horizon_h` hours, the same model (shape, lookback) fitted at earlier points
    of the history once it had the history that shape needs."""
    pair = _slot_pair(starts, tz)
    own = pair[1] if shape == "hour-of-week" else pair[0] if shape == "hour-of-day" else np.zeros(len(usage), int)
    first = max(lookback_h, {"flat": lookback_h, "hour-of-day": DAILY_MIN_H, "hour-of-week": WEEKLY_MIN_H}[shape])
    out = []
    for cut in range(first, len(usage) - horizon_h + 1, step_h):
        profile, level = _fit_arrays(usage[:cut], (pair[0][:cut], pair[1][:cut]), shape, lookback_h)
        want = level * profile[own[cut:cut + horizon_h]].sum()
        if want > 0:
            out.append(usage[cut:cut + horizon_h].sum() / want)
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
