"""Provider quotas: usage since the last reset, the state it puts a provider in, and when it runs out, as plain
data the loop's provider_quotas asset, the `tm` commands and the MCP tools all read (`status`, `predict`)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pandas as pd
import psycopg

from tm_resources import alerts, forecast
from tm_resources.config import Config, ConfigError, QuotaConfig, QuotaReset
from tm_resources.db import one
from tm_resources.events import EventSink

log = logging.getLogger(__name__)

STATES = ("ok", "warning", "critical", "exhausted")
# Providers in these states are avoided by `auto` and presets (the loop's shift:<provider> rule).
SHIFT_STATES = ("critical", "exhausted")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# What one request row adds to each type of quota.
_UNIT_SQL = {
    "tokens": "input_tokens + output_tokens + cache_read_tokens + cache_write_tokens",
    "requests": "1",
    "messages": "(status = 200)::int",
    "budget": "cost_usd",
}
UNIT_NAMES = {"tokens": "tokens", "requests": "requests", "messages": "messages", "budget": "USD"}
HISTORY_H = 28 * 24        # the rate's shape is read from the last four weeks of the log
MAX_HORIZON_H = 62 * 24    # beyond two months "at this rate" means little
MODES = ("manual", "dry-run", "auto")


# ------------------------------------------------------------------------------------------ resets

def last_reset(reset: QuotaReset | None, tz: str, now: datetime) -> datetime | None:
    """The latest scheduled reset at or before `now` (UTC), or None (no schedule, or a fixed date ahead)."""
    if reset is None:
        return None
    zone = ZoneInfo(tz)
    local = now.astimezone(zone)
    if reset.every == "fixed":
        at = _fixed(reset, zone)
        return at if at <= now else None
    if reset.every == "daily":
        day = local.date()
        at = _at(day, reset.hour, zone)
        return at if at <= now else _at(day - timedelta(days=1), reset.hour, zone)
    if reset.every == "weekly":
        assert isinstance(reset.day, str)  # QuotaReset's validator: a weekly reset has a weekday
        back = (local.weekday() - WEEKDAYS.index(reset.day)) % 7
        day = local.date() - timedelta(days=back)
        at = _at(day, reset.hour, zone)
        return at if at <= now else _at(day - timedelta(days=7), reset.hour, zone)
    assert isinstance(reset.day, int)  # QuotaReset's validator: a monthly reset has a day of the month
    day = local.date().replace(day=reset.day)
    at = _at(day, reset.hour, zone)
    return at if at <= now else _at(_month_before(day), reset.hour, zone)


def next_reset(reset: QuotaReset | None, tz: str, now: datetime) -> datetime | None:
    """The first scheduled reset after `now` (UTC), or None."""
    if reset is None:
        return None
    zone = ZoneInfo(tz)
    if reset.every == "fixed":
        at = _fixed(reset, zone)
        return at if at > now else None
    last = last_reset(reset, tz, now)
    assert last is not None  # a repeating schedule always has a last reset
    day = last.astimezone(zone).date()
    if reset.every == "daily":
        return _at(day + timedelta(days=1), reset.hour, zone)
    if reset.every == "weekly":
        return _at(day + timedelta(days=7), reset.hour, zone)
    return _at(_month_after(day), reset.hour, zone)


def _at(day: date, hour: int, zone: ZoneInfo) -> datetime:
    # Wall-clock time in the quota's zone: a reset at 07:00 stays at 07:00 across daylight-saving changes
    # (an hour the clocks skip resolves to the moment they jump, fold=0).
    return datetime.combine(day, time(hour), tzinfo=zone).astimezone(UTC)


def _fixed(reset: QuotaReset, zone: ZoneInfo) -> datetime:
    at = reset.date
    assert at is not None  # QuotaReset's validator: a fixed reset has a date
    return (at if at.tzinfo else at.replace(tzinfo=zone)).astimezone(UTC)


def _month_before(day: date) -> date:
    return day.replace(year=day.year - 1, month=12) if day.month == 1 else day.replace(month=day.month - 1)


def _month_after(day: date) -> date:
    return day.replace(year=day.year + 1, month=1) if day.month == 12 else day.replace(month=day.month + 1)


# ------------------------------------------------------------------------------------------ reading usage

@dataclass(frozen=True)
class Reading:
    """What the provider's own endpoint says (source api)."""

    used: float | None               # None: the provider could not be asked (source api)
    limit: float | None


def read_openrouter(url: str, api_key: str, timeout_s: float = 5.0) -> Reading:
    """OpenRouter's GET /api/v1/key: `data.usage` (credits used, USD) and `data.limit` (null: none). When the
    key's limit resets (`limit_reset`: daily / weekly / monthly), the usage of that period counts."""
    reply = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s)
    if reply.status_code != 200:
        raise ValueError(f"{url} answered HTTP {reply.status_code}")
    try:
        data = reply.json()["data"]
        period = data.get("limit_reset")
        used = data.get(f"usage_{period}") if period in ("daily", "weekly", "monthly") else None
        used = float(data["usage"] if used is None else used)
        limit = data.get("limit")
        return Reading(used, float(limit) if limit is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{url} did not answer in OpenRouter's key shape (data.usage, data.limit)") from None


def _logged(conn: psycopg.Connection, provider: str, kind: str, start: datetime | None, end: datetime) -> float:
    value = one(conn.execute(f"SELECT coalesce(sum({_UNIT_SQL[kind]}), 0) FROM requests"
                             " WHERE provider = %s AND ts >= %s AND ts < %s",
                         (provider, start or datetime(1970, 1, 1, tzinfo=UTC), end)))[0]
    return float(value)


def hourly_usage(conn: psycopg.Connection, provider: str, kind: str, now: datetime,
                 hours: int = HISTORY_H) -> tuple[np.ndarray, pd.DatetimeIndex]:
    """The provider's usage in each of the `hours` hours before `now` (the last bin ends at `now`)."""
    start = now - timedelta(hours=hours)
    rows = conn.execute(
        f"SELECT floor(extract(epoch FROM (%s - ts)) / 3600)::int AS ago, sum({_UNIT_SQL[kind]})"
        " FROM requests WHERE provider = %s AND ts >= %s AND ts < %s GROUP BY 1",
        (now, provider, start, now)).fetchall()
    usage = np.zeros(hours)
    for ago, value in rows:
        usage[hours - 1 - int(ago)] += float(value or 0)
    starts = pd.date_range(pd.Timestamp(start), periods=hours, freq="h")
    return usage, starts


def _adjustments(conn: psycopg.Connection, provider: str, since: datetime | None, now: datetime) -> tuple:
    """(the latest `tm reset` at or before now, the latest `tm set-usage` reading after the window start)."""
    reset = one(conn.execute("SELECT max(ts) FROM quota_adjustments WHERE provider = %s AND kind = 'reset'"
                             " AND ts <= %s", (provider, now)))[0]
    start = max(filter(None, [since, reset]), default=None)
    reading = conn.execute(
        "SELECT ts, value, unit FROM quota_adjustments WHERE provider = %s AND kind = 'usage' AND ts <= %s"
        " AND (%s::timestamptz IS NULL OR ts >= %s) ORDER BY ts DESC, id DESC LIMIT 1",
        (provider, now, start, start)).fetchone()
    return reset, reading


# ------------------------------------------------------------------------------------------ status

@dataclass(frozen=True)
class ProviderQuota:
    provider: str
    source: str
    type: str
    unit: str
    used: float | None               # None: the provider could not be asked (source api)
    limit: float | None
    used_fraction: float | None
    state: str                       # ok | warning | critical | exhausted | unknown (api unreachable)
    window_start: datetime | None
    reset_at: datetime | None
    rate_per_h: float
    shape: str                       # the rate's model: flat | hour-of-day | hour-of-week
    exhausts_in_h: float | None
    exhausts_early_h: float | None
    exhausts_late_h: float | None
    exhausts_at: datetime | None
    exhausts_before_reset: bool | None
    summary: str
    tier: int
    priority: int
    timezone: str
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def quota_of(config: Config, provider: str) -> QuotaConfig:
    """The provider's quota settings; a provider without a `quota:` block is self-tracked tokens, no limit."""
    if provider not in config.providers:
        raise ConfigError(f"'{provider}' is not one of the providers ({', '.join(sorted(config.providers))})")
    return config.providers[provider].quota or QuotaConfig()


def state_of(fraction: float | None, q: QuotaConfig) -> str:
    if fraction is None or q.source == "unlimited":
        return "ok"
    if fraction >= 1:
        return "exhausted"
    return "critical" if fraction >= q.critical else "warning" if fraction >= q.warning else "ok"


def provider_status(conn: psycopg.Connection, config: Config, provider: str, now: datetime,
                    reader=read_openrouter) -> ProviderQuota:
    """One provider's quota at `now`."""
    q = quota_of(config, provider)
    scheduled = last_reset(q.reset, q.timezone, now)
    manual_reset, reading = _adjustments(conn, provider, scheduled, now)
    window_start = max(filter(None, [scheduled, manual_reset]), default=None)
    reset_at = next_reset(q.reset, q.timezone, now)
    limit, error = (None if q.source == "unlimited" else q.limit), None
    if q.source == "api":
        try:
            got = reader(_api_url(config, provider), _api_key(config, provider))
            used, limit = got.used, got.limit if got.limit is not None else q.limit
        except (httpx.HTTPError, ValueError) as err:
            used, error = math.nan, _safe_error(err, config, provider)
    elif reading is not None:
        at, value, unit = reading
        base = value * limit if unit == "fraction" and limit else value
        used = base if q.source == "manual" else base + _logged(conn, provider, q.type, at, now)
    elif q.source == "manual":
        used = 0.0
    else:
        used = _logged(conn, provider, q.type, window_start, now)
    model = forecast.fit(*hourly_usage(conn, provider, q.type, now), now, q.timezone)
    fraction = used / limit if limit and not math.isnan(used) else None
    state = "unknown" if error else state_of(fraction, q)
    ex = None
    if fraction is not None and q.source != "unlimited" and model.level > 0:
        ex = forecast.exhaustion(model, max(limit - used, 0.0), MAX_HORIZON_H)
    before = None if ex is None or ex.at is None or reset_at is None else ex.at < reset_at
    quota = ProviderQuota(
        provider=provider, source=q.source, type=q.type, unit=UNIT_NAMES[q.type],
        used=None if math.isnan(used) else round(used, 6), limit=limit,
        used_fraction=None if fraction is None else round(fraction, 6), state=state,
        window_start=window_start, reset_at=reset_at, rate_per_h=round(model.rate_per_h, 6), shape=model.shape,
        exhausts_in_h=_h(ex.hours if ex else None), exhausts_early_h=_h(ex.early if ex else None),
        exhausts_late_h=_h(ex.late if ex else None), exhausts_at=ex.at if ex else None,
        exhausts_before_reset=before, summary="", tier=q.tier, priority=q.priority, timezone=q.timezone, error=error)
    return _with_summary(quota, now)


def status(conn: psycopg.Connection, config: Config, now: datetime | None = None,
           provider: str | None = None, reader=read_openrouter) -> list[ProviderQuota]:
    """Every provider's quota (or one's), by tier, then priority, then name."""
    now = now or datetime.now(UTC)
    names = [provider] if provider else sorted(config.providers)
    if provider:
        quota_of(config, provider)
    found = [provider_status(conn, config, p, now, reader) for p in names]
    return sorted(found, key=lambda s: (s.tier, s.priority, s.provider))


def predict(conn: psycopg.Connection, config: Config, now: datetime | None = None, hours: int = 24,
            provider: str | None = None, reader=read_openrouter) -> list[dict]:
    """Where each quota will stand `hours` from now at the current rate (with its interval), and whether it
    runs out or resets on the way."""
    if not 1 <= hours <= MAX_HORIZON_H:
        raise ValueError(f"hours must be from 1 to {MAX_HORIZON_H}, not {hours}")
    now = now or datetime.now(UTC)
    out = []
    for s in status(conn, config, now, provider, reader):
        q = quota_of(config, s.provider)
        model = forecast.fit(*hourly_usage(conn, s.provider, q.type, now), now, q.timezone)
        until = now + timedelta(hours=hours)
        reset_at = s.reset_at if s.reset_at is not None and s.reset_at <= until else None
        resets = reset_at is not None
        # After a reset within the horizon only the usage since it counts.
        skip = math.ceil((reset_at - now) / timedelta(hours=1)) if reset_at is not None else 0
        expected = float(model.expected(hours)[skip:].sum())
        low, high = model.spread(hours)
        base = 0.0 if resets or s.used is None else s.used
        projected = {"expected": base + expected, "low": base + expected * low, "high": base + expected * high}
        fractions = {k: round(v / s.limit, 6) for k, v in projected.items()} if s.limit else None
        runs_out = s.exhausts_in_h is not None and s.exhausts_in_h <= hours and not (
            reset_at is not None and s.exhausts_at is not None and reset_at <= s.exhausts_at)
        out.append({"provider": s.provider, "hours": hours, "until": until, "state": s.state, "unit": s.unit,
                    "used": s.used, "limit": s.limit, "used_fraction": s.used_fraction,
                    "expected_usage": round(expected, 6),
                    "projected_used": {k: round(v, 6) for k, v in projected.items()},
                    "projected_fraction": fractions, "resets_within": resets, "reset_at": s.reset_at,
                    "exhausts_within": runs_out, "exhausts_at": s.exhausts_at if runs_out else None,
                    "rate_per_h": s.rate_per_h, "shape": s.shape, "summary": s.summary})
    return out


def _h(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)


def _api_url(config: Config, provider: str) -> str:
    p = config.providers[provider]
    return (p.quota.api_url if p.quota else None) or p.base_url.rstrip("/") + "/key"


def _api_key(config: Config, provider: str) -> str:
    keys = config.providers[provider].api_keys()
    if not keys:
        names = " or ".join(config.providers[provider].api_key_env) or "api_key_env"
        raise ValueError(f"no API key for {provider}: set {names}")
    return keys[0]


def _safe_error(err: Exception, config: Config, provider: str) -> str:
    text = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
    for key in config.providers[provider].api_keys():
        text = text.replace(key, "[SECRET]")
    return text


def amount_text(value: float | None, unit: str) -> str:
    if value is None:
        return "?"
    if unit == "USD":
        return f"${value:,.2f}"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix} {unit}"
    return f"{value:,.0f} {unit}"


def _when(at: datetime, tz: str, now: datetime) -> str:
    """A weekday within the coming or past week, else the date; in the quota's own zone."""
    local = at.astimezone(ZoneInfo(tz))
    text = f"{local:%A %H:%M}" if abs(at - now) < timedelta(days=6) else f"{local:%Y-%m-%d %H:%M}"
    return text + ("" if tz == "UTC" else f" {tz}")


def _with_summary(s: ProviderQuota, now: datetime) -> ProviderQuota:
    """"anthropic: 71% used, at this rate exhausted in 6.2 h (5.1-7.8 h), before its reset on Wednesday 07:00"."""
    from dataclasses import replace

    if s.error:
        return replace(s, summary=f"{s.provider}: usage unknown ({s.error})")
    if s.used_fraction is None:
        text = f"{s.provider}: {amount_text(s.used, s.unit)} used"
        text += f" since {_when(s.window_start, s.timezone, now)}" if s.window_start else ""
        text += ", unlimited" if s.source == "unlimited" else ", no limit set"
        return replace(s, summary=text + f" ({amount_text(s.rate_per_h, s.unit)}/h lately)")
    text = f"{s.provider}: {s.used_fraction:.0%} used"
    reset = f"its reset on {_when(s.reset_at, s.timezone, now)}" if s.reset_at else None
    if s.state == "exhausted":
        text += ", exhausted" + (f" until {reset}" if reset else "")
    elif s.exhausts_in_h is None:
        text += ", not exhausted at this rate" + (f" before {reset}" if reset else " within two months")
    elif reset and not s.exhausts_before_reset:
        text += f", at this rate not exhausted before {reset} (it would last {_fmt_h(s.exhausts_in_h, unit=True)})"
    else:
        interval = f"{_fmt_h(s.exhausts_early_h)}-{_fmt_h(s.exhausts_late_h, unit=True)}"
        text += f", at this rate exhausted in {_fmt_h(s.exhausts_in_h, unit=True)} ({interval})"
        text += f", before {reset}" if reset else ""
    return replace(s, summary=text)


def _fmt_h(h: float | None, unit: bool = False) -> str:
    if h is None:
        return "never" if not unit else "over 2 months"
    if h >= 48:
        return f"{h / 24:.1f}" + (" d" if unit else "")
    return f"{h:.1f}" + (" h" if unit else "")


# ------------------------------------------------------------------------------------------ what operators set

def parse_usage(text: str) -> tuple[float, str]:
    """`79%` -> (0.79, 'fraction'); `1200000`, `1.2M`, `$12.50` -> (amount, 'amount'); ValueError otherwise."""
    t = text.strip().replace(",", "").replace("_", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", t):
        return float(m[1]) / 100, "fraction"
    if m := re.fullmatch(r"\$?(\d+(?:\.\d+)?)\s*([kKmMgG]?)", t):
        return float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2].lower()], "amount"
    raise ValueError(f"{text!r} is not a usage: give a percentage of the limit (79%) or an amount "
                     "in the quota's unit (1200000, 1.2M, $12.50)")


def set_usage(conn: psycopg.Connection, config: Config, provider: str, text: str,
              now: datetime | None = None) -> dict:
    """Record what the provider's own dashboard says is used now; usage logged after it adds to it."""
    q = quota_of(config, provider)
    value, unit = parse_usage(text)
    if unit == "fraction" and q.limit is None:
        raise ValueError(f"{provider} has no quota.limit in tm.yaml: give an amount (e.g. 1.2M), not a percentage")
    ts = now or datetime.now(UTC)
    conn.execute("INSERT INTO quota_adjustments (ts, provider, kind, value, unit) VALUES (%s, %s, 'usage', %s, %s)",
                 (ts, provider, value, unit))
    return {"provider": provider, "set_at": ts, "value": value, "unit": unit,
            "used": value * q.limit if unit == "fraction" and q.limit else value, "quota_unit": UNIT_NAMES[q.type]}


def record_reset(conn: psycopg.Connection, config: Config, provider: str, now: datetime | None = None) -> dict:
    """The provider's quota starts again now (usage before it no longer counts)."""
    quota_of(config, provider)
    ts = now or datetime.now(UTC)
    conn.execute("INSERT INTO quota_adjustments (ts, provider, kind) VALUES (%s, %s, 'reset')", (ts, provider))
    return {"provider": provider, "reset_at": ts}


def loop_mode(conn: psycopg.Connection, config: Config) -> tuple[str, str]:
    """(the loop's mode, where it comes from): `tm mode` (the database) overrides tm.yaml's loop.mode."""
    row = conn.execute("SELECT value FROM tm_settings WHERE name = 'loop.mode'").fetchone()
    return (row[0], "tm mode") if row and row[0] in MODES else (config.loop.mode, "tm.yaml loop.mode")


def set_loop_mode(conn: psycopg.Connection, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    conn.execute("INSERT INTO tm_settings (name, value) VALUES ('loop.mode', %s)"
                 " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = now()", (mode,))


def with_loop_mode(conn: psycopg.Connection, config: Config) -> Config:
    """The configuration with the mode `tm mode` set, for the loop run that reads it."""
    mode, _ = loop_mode(conn, config)
    if mode == config.loop.mode:
        return config
    return config.model_copy(update={"loop": config.loop.model_copy(update={"mode": mode})})


# ------------------------------------------------------------------------------------------ state changes

def record_state_changes(conn: psycopg.Connection, quotas: list[ProviderQuota], previous: dict[str, str],
                         sink: EventSink | None = None) -> list[str]:
    """An alert (row, log line, PostHog event) for each provider whose state moved since `previous`
    (provider -> state); once per state and quota window, whoever records it first."""
    moved = []
    for s in quotas:
        before = previous.get(s.provider)
        if s.state == "unknown" or before == s.state or (before is None and s.state == "ok"):
            continue
        period = s.window_start or datetime(1970, 1, 1, tzinfo=UTC)
        if alerts.record(conn, kind="quota", subject=f"provider:{s.provider}", level=s.state, period_start=period,
                         message=s.summary, sink=sink,
                         data={"provider": s.provider, "previous_state": before, "state": s.state,
                               "used_fraction": s.used_fraction, "exhausts_in_h": s.exhausts_in_h}):
            moved.append(s.provider)
    return moved
