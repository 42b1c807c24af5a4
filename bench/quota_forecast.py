"""Benchmark: how far off the quota forecaster's exhaustion times are, backtested on replayed traffic.

    .venv/bin/python bench/quota_forecast.py [--weeks 8] [--seeds 3] [--tz Europe/Paris]

The traffic is synthetic (the ShareGPT dump has no timestamps): a team working 09:00-18:00 on weekdays in `--tz`
with a lunch dip, a little evening and weekend use, a level that drifts from day to day (a random walk of
about 10 % a day), Poisson requests and log-normal token counts per request. At every 7th hour after the
first two weeks, each forecaster is given the history so far and a remaining quota chosen so that it truly
runs out exactly `H` hours later (H = 6, 24, 72); its error is predicted - true. Forecasters, all
`tm_resources.forecast` (the code `tm status` and the loop run):

- model: the shipped one (hour-of-week shape once two weeks are seen, times the last 24 hours' level);
- hour-of-day: the same with only three days of history (a daily shape);
- flat: the same with only the last 48 hours (no shape: the last 24 hours' mean rate).

Prints a JSON block: per forecaster and horizon, the median and 90th-percentile absolute error in hours,
the median relative error, and how often the true time fell inside the 80 % interval; plus the time one
forecast (fit, interval, exhaustion) takes on four weeks of hours.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tm_resources import forecast  # noqa: E402

HORIZONS = (6, 24, 72)


def team_traffic(weeks: int, tz: str, seed: int) -> tuple[np.ndarray, pd.DatetimeIndex]:
    """Hourly tokens of a team, UTC hour bins."""
    rng = np.random.default_rng(seed)
    starts = pd.date_range("2026-09-07", periods=weeks * 7 * 24, freq="h", tz="UTC")
    local = starts.tz_convert(tz)
    hour, weekday = np.asarray(local.hour), np.asarray(local.day_of_week)
    working = (hour >= 9) & (hour < 18) & (weekday < 5)
    shape = np.where(working, 1.0, 0.04)
    shape = np.where(working & (hour == 12), 0.5, shape)                  # lunch
    shape = np.where((hour >= 19) & (hour < 23) & (weekday < 5), 0.15, shape)
    shape = np.where((weekday >= 5) & (hour >= 10) & (hour < 18), 0.1, shape)
    days = len(starts) // 24
    level = np.exp(np.cumsum(rng.normal(0, 0.1, days)))                   # the team's day-to-day drift
    requests_per_h = 40 * shape * np.repeat(level, 24)
    n = rng.poisson(requests_per_h)
    tokens = np.array([rng.lognormal(np.log(1500), 0.9, k).sum() if k else 0.0 for k in n])
    return tokens, starts


def true_exhaustion(usage: np.ndarray, cut: int, horizon: int) -> tuple[float, float]:
    """(remaining that runs out exactly `horizon` h after `cut`, that horizon): the usage of those hours."""
    return float(usage[cut:cut + horizon].sum()), float(horizon)


def backtest(usage: np.ndarray, starts: pd.DatetimeIndex, tz: str) -> dict[str, dict[int, list[tuple]]]:
    names = ("model", "hour-of-day", "flat")
    out: dict[str, dict[int, list[tuple]]] = {name: {h: [] for h in HORIZONS} for name in names}
    for cut in range(14 * 24, len(usage) - max(HORIZONS), 7):
        now = starts[cut].to_pydatetime()
        for name, first in (("model", 0), ("hour-of-day", cut - 3 * 24 - 1), ("flat", cut - 48)):
            model = forecast.fit(usage[first:cut], starts[first:cut], now, tz)
            for h in HORIZONS:
                remaining, truth = true_exhaustion(usage, cut, h)
                if remaining <= 0:
                    continue
                ex = forecast.exhaustion(model, remaining, 24 * 62)
                if ex.hours is None:
                    out[name][h].append((np.inf, truth, False))
                    continue
                inside = ex.early is not None and ex.early <= truth <= (ex.late if ex.late is not None else np.inf)
                out[name][h].append((ex.hours, truth, inside))
    return out


def summarise(found: list[tuple]) -> dict:
    pred = np.array([p for p, _, _ in found])
    truth = np.array([t for _, t, _ in found])
    err = np.abs(pred - truth)
    return {"forecasts": len(found), "median_abs_error_h": round(float(np.median(err)), 2),
            "p90_abs_error_h": round(float(np.percentile(err, 90)), 2),
            "median_rel_error": round(float(np.median(err / truth)), 3),
            "interval_coverage": round(float(np.mean([inside for _, _, inside in found])), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weeks", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tz", default="Europe/Paris")
    args = ap.parse_args()
    pooled: dict[str, dict[int, list]] = {}
    for seed in range(args.seeds):
        usage, starts = team_traffic(args.weeks, args.tz, seed)
        for name, by_h in backtest(usage, starts, args.tz).items():
            for h, rows in by_h.items():
                pooled.setdefault(name, {}).setdefault(h, []).extend(rows)
    usage, starts = team_traffic(4, args.tz, 99)
    now = starts[-1].to_pydatetime() + forecast.HOUR
    t0 = time.perf_counter()
    runs = 20
    for _ in range(runs):
        model = forecast.fit(usage, starts, now, args.tz)
        forecast.exhaustion(model, float(usage[-24:].sum()), 24 * 62)
    per_forecast_ms = (time.perf_counter() - t0) / runs * 1000
    report = {
        "machine": f"{platform.machine()} {platform.python_version()}",
        "weeks": args.weeks, "seeds": args.seeds, "tz": args.tz,
        "errors": {name: {f"{h}h": summarise(rows) for h, rows in by_h.items()} for name, by_h in pooled.items()},
        "one_forecast_ms_4_weeks_history": round(per_forecast_ms, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
