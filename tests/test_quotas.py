"""Provider quotas: reset schedules in any time zone and across daylight-saving changes, usage from the log plus
what operators set by hand, OpenRouter's key endpoint, forecasts of exhaustion, the state alerts and the loop's
provider_quotas asset, and per-task-type quality bars in the decision engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import pandas as pd
import psycopg
import pytest

from tests.conftest import make_config, query
from tests.fakes import FakePostHog
from tests.fakes.openrouter import FakeOpenRouter
from tm_assets.assets import provider_quotas, requests_source, routing_rules
from tm_assets.decisions import decide
from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig
from tm_resources import forecast, quotas
from tm_resources.config import ConfigError, QuotaReset, Thresholds, parse_config

OPENROUTER_KEY = "sk-or-v1-0123456789abcdef0123456789abcdef"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# ------------------------------------------------------------------------------------------ resets

@pytest.mark.parametrize("reset, tz, now, last, nxt", [
    # Paris moves to summer time on 2026-03-29: the day of the change is 23 hours long, 07:00 stays 07:00.
    ({"every": "daily", "hour": 7}, "Europe/Paris", utc(2026, 3, 29, 4), utc(2026, 3, 28, 6), utc(2026, 3, 29, 5)),
    ({"every": "daily", "hour": 7}, "Europe/Paris", utc(2026, 3, 29, 5, 30), utc(2026, 3, 29, 5), utc(2026, 3, 30, 5)),
    # New York leaves summer time on 2026-11-01: that week is 169 hours long.
    ({"every": "weekly", "day": "wednesday", "hour": 7}, "America/New_York", utc(2026, 11, 3, 12),
     utc(2026, 10, 28, 11), utc(2026, 11, 4, 12)),
    # Exactly at the reset: a new window has begun.
    ({"every": "weekly", "day": "wednesday", "hour": 7}, "America/New_York", utc(2026, 11, 4, 12),
     utc(2026, 11, 4, 12), utc(2026, 11, 11, 12)),
    # Tokyo has no daylight saving; its first of the month begins on the 30th/31st in UTC, and wraps the year.
    ({"every": "monthly", "day": 1}, "Asia/Tokyo", utc(2026, 12, 1, 10), utc(2026, 11, 30, 15), utc(2026, 12, 31, 15)),
    ({"every": "monthly", "day": 1}, "Asia/Tokyo", utc(2026, 12, 31, 14), utc(2026, 11, 30, 15), utc(2026, 12, 31, 15)),
    ({"every": "monthly", "day": 15, "hour": 9}, "UTC", utc(2027, 1, 10), utc(2026, 12, 15, 9), utc(2027, 1, 15, 9)),
    # A fixed date in Sydney's summer time (UTC+11).
    ({"every": "fixed", "date": "2026-12-15T00:00"}, "Australia/Sydney", utc(2026, 12, 1), None, utc(2026, 12, 14, 13)),
    ({"every": "fixed", "date": "2026-12-15T00:00"}, "Australia/Sydney", utc(2026, 12, 20), utc(2026, 12, 14, 13), None),
])
def test_reset_schedules_keep_local_wall_time(reset, tz, now, last, nxt):
    r = QuotaReset.model_validate(reset)
    assert quotas.last_reset(r, tz, now) == last
    assert quotas.next_reset(r, tz, now) == nxt


@pytest.mark.parametrize("quota, message", [
    ({"reset": {"every": "weekly", "hour": 7}}, "a weekly reset needs `day`"),
    ({"reset": {"every": "monthly", "day": 31}}, "a day of the month from 1 to 28"),
    ({"reset": {"every": "fixed"}}, "a fixed reset needs `date`"),
    ({"reset": {"every": "daily", "hour": 24}}, "providers.anthropic.quota.reset.hour"),
    ({"timezone": "Mars/Olympus"}, "'Mars/Olympus' is not a time zone"),
    ({"warning": 0.9, "critical": 0.8}, "warning (0.9) must not be above critical (0.8)"),
    ({"source": "api", "type": "tokens"}, "set type: budget"),
    ({"source": "guess"}, "providers.anthropic.quota.source"),
    ({"limit": -5}, "providers.anthropic.quota.limit"),
])
def test_bad_quota_settings_are_refused_with_the_key_to_fix(quota, message):
    data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json")
    data["providers"]["anthropic"]["quota"] = quota
    with pytest.raises(ConfigError) as err:
        parse_config(data, "tm.yaml")
    assert "providers.anthropic.quota" in str(err.value) and message in str(err.value)


# ------------------------------------------------------------------------------------------ forecasts

def _hours(n: int, end: datetime) -> pd.DatetimeIndex:
    return pd.date_range(pd.Timestamp(end - timedelta(hours=n)), periods=n, freq="h")


def test_a_steady_rate_gives_the_right_exhaustion_time():
    now = utc(2026, 11, 30, 12)
    model = forecast.fit(np.full(240, 1000.0), _hours(240, now), now)
    ex = forecast.exhaustion(model, 6200, 24 * 62)
    assert ex.hours == pytest.approx(6.2)
    assert ex.early <= 6.2 <= ex.late and ex.late - ex.early < 1
    assert model.rate_per_h == pytest.approx(1000)


def test_the_forecast_follows_the_teams_working_day():
    # Three weeks of traffic 09:00-17:00 on weekdays in Paris, none at night or at weekends.
    now = utc(2026, 11, 24, 16)     # Tuesday 17:00 in Paris, as the day's work ends
    starts = _hours(21 * 24, now)
    local = starts.tz_convert("Europe/Paris")
    usage = np.where((local.hour >= 9) & (local.hour < 17) & (local.day_of_week < 5), 1000.0, 0.0)
    model = forecast.fit(usage, starts, now, "Europe/Paris")
    assert model.shape == "hour-of-week"
    # 1,500 tokens left: nothing is used overnight, so they last until 10:30 tomorrow, not 1.5 h.
    ex = forecast.exhaustion(model, 1500, 24 * 62)
    at = ex.at.astimezone(pd.Timestamp(0).tz_localize("Europe/Paris").tz)
    assert (at.day, at.hour) == (25, 10) and 17 < ex.hours < 18
    flat = forecast.fit(usage[-48:], starts[-48:], now, "Europe/Paris")
    assert flat.shape == "flat" and flat.hours_until(1500, 24 * 62) < 5


def test_no_usage_means_no_exhaustion():
    now = utc(2026, 11, 30, 12)
    model = forecast.fit(np.zeros(48), _hours(48, now), now)
    assert forecast.exhaustion(model, 100, 100).hours is None


# ------------------------------------------------------------------------------------------ usage and status

def _config(anthropic_quota=None, local_quota=None, **extra):
    data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json")
    if anthropic_quota is not None:
        data["providers"]["anthropic"]["quota"] = anthropic_quota
    if local_quota is not None:
        data["providers"]["local"]["quota"] = local_quota
    data.update(extra)
    return parse_config(data, "test config")


def log_steady(db_url: str, provider: str, end: datetime, hours: int, tokens_per_hour: int, per_hour: int = 4) -> None:
    """`per_hour` requests an hour on `provider`, `tokens_per_hour` tokens an hour in all, for `hours` hours."""
    each = tokens_per_hour // per_hour
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO requests (id, ts, user_id, api_format, endpoint, model, provider, status, input_tokens,"
            " output_tokens, cost_usd) SELECT gen_random_uuid(), %s - ((i - 0.5) * interval '1 hour' / %s), 'alice', 'openai',"
            " '/v1/chat/completions', 'm', %s, 200, %s, %s, 0.01 FROM generate_series(1, %s) AS i",
            (end, per_hour, provider, each // 2, each - each // 2, hours * per_hour))


def test_status_counts_the_log_since_the_last_reset_and_forecasts(db_url):
    now = utc(2026, 11, 30, 20)    # a Monday
    log_steady(db_url, "anthropic", now, 14 * 24, 1000)
    config = _config({"type": "tokens", "limit": 26200, "reset": {"every": "daily", "hour": 0}},
                     {"type": "requests", "reset": {"every": "weekly", "day": "wednesday", "hour": 7}})
    with psycopg.connect(db_url) as conn:
        [a, loc] = quotas.status(conn, config, now)
    assert a.provider == "anthropic" and a.used == 20000 and a.used_fraction == pytest.approx(20000 / 26200)
    assert a.state == "ok" and a.window_start == utc(2026, 11, 30) and a.reset_at == utc(2026, 12, 1)
    assert a.exhausts_in_h == pytest.approx(6.2, abs=0.05)
    assert a.summary == "anthropic: 76% used, at this rate not exhausted before its reset on Tuesday 00:00 " \
                        "(it would last 6.2 h)"
    # A weekly reset on Wednesday comes after: the forecast and its interval are said.
    weekly = _config({"type": "tokens", "limit": 26200, "timezone": "Europe/Paris",
                      "reset": {"every": "weekly", "day": "wednesday", "hour": 7}})
    with psycopg.connect(db_url) as conn:
        w = quotas.status(conn, weekly, now, provider="anthropic")[0]
    assert w.used == 1000 * (24 * 5 + 14) and w.state == "exhausted"    # since Wednesday 06:00 UTC
    weekly = _config({"type": "tokens", "limit": w.used + 6200, "timezone": "Europe/Paris",
                      "reset": {"every": "weekly", "day": "wednesday", "hour": 7}})
    with psycopg.connect(db_url) as conn:
        w = quotas.status(conn, weekly, now, provider="anthropic")[0]
    assert w.summary.startswith("anthropic: 96% used, at this rate exhausted in 6.2 h (")
    assert w.summary.endswith(" h), before its reset on Wednesday 07:00 Europe/Paris")
    assert w.exhausts_early_h <= 6.2 <= w.exhausts_late_h
    # No limit: usage is shown, no state but ok, no forecast.
    assert (loc.used, loc.limit, loc.state, loc.exhausts_in_h) == (0, None, "ok", None)
    assert "no limit set" in loc.summary


def test_set_usage_and_reset_move_the_count(db_url):
    now = utc(2026, 11, 30, 20)
    log_steady(db_url, "anthropic", now, 48, 1000)
    config = _config({"limit": 100000, "reset": {"every": "monthly", "day": 1}})
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert quotas.status(conn, config, now)[0].used == 48000
        # The provider's dashboard says 79%; what is logged afterwards (10:00 to 20:00, 10,000) adds to it.
        quotas.set_usage(conn, config, "anthropic", "79%", now=utc(2026, 11, 30, 10))
        s = quotas.status(conn, config, now)[0]
        assert s.used == 79000 + 10000 and s.state == "warning"
        quotas.set_usage(conn, config, "anthropic", "1.5M", now=utc(2026, 11, 30, 10))
        assert quotas.status(conn, config, now)[0].state == "exhausted"
        # A reset: only what was logged since counts, and the reading before it no longer does.
        quotas.record_reset(conn, config, "anthropic", now=utc(2026, 11, 30, 18))
        s = quotas.status(conn, config, now)[0]
        assert (s.used, s.state, s.window_start) == (2000, "ok", utc(2026, 11, 30, 18))
        with pytest.raises(ValueError, match="not a usage"):
            quotas.set_usage(conn, config, "anthropic", "lots")
        with pytest.raises(ConfigError, match="'antropic' is not one of the providers"):
            quotas.set_usage(conn, config, "antropic", "50%")
        with pytest.raises(ValueError, match="no quota.limit"):
            quotas.set_usage(conn, _config(), "local", "50%")


def test_a_manual_quota_is_what_was_set_and_unlimited_has_no_state(db_url):
    now = utc(2026, 11, 30, 20)
    log_steady(db_url, "anthropic", now, 48, 1000)
    config = _config({"source": "manual", "type": "messages", "limit": 200}, {"source": "unlimited", "limit": 10})
    with psycopg.connect(db_url, autocommit=True) as conn:
        quotas.set_usage(conn, config, "anthropic", "150", now=utc(2026, 11, 30, 10))
        a, loc = quotas.status(conn, config, now)
    assert (a.used, a.unit, a.state) == (150, "messages", "ok")
    assert a.rate_per_h == pytest.approx(4)     # the log's rate still drives the forecast
    assert loc.state == "ok" and loc.exhausts_in_h is None and "unlimited" in loc.summary


def test_openrouter_key_endpoint_is_the_api_source(db_url, monkeypatch):
    monkeypatch.setenv("TM_TEST_OPENROUTER_KEY", OPENROUTER_KEY)
    now = utc(2026, 11, 30, 20)
    with FakeOpenRouter(OPENROUTER_KEY, usage=96.5, limit=100, limit_reset="monthly", usage_monthly=25.5) as orr:
        data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json")
        data["providers"]["openrouter"] = {"kind": "openai", "base_url": orr.base_url,
                                           "api_key_env": ["TM_TEST_OPENROUTER_KEY"],
                                           "quota": {"source": "api", "type": "budget"}}
        config = parse_config(data)
        with psycopg.connect(db_url) as conn:
            s = quotas.status(conn, config, now, provider="openrouter")[0]
        assert orr.seen_keys == [OPENROUTER_KEY]
        # The key's limit resets monthly: this month's usage counts.
        assert (s.used, s.limit, s.unit, s.state) == (25.5, 100, "USD", "ok")
        assert s.summary.startswith("openrouter: 26% used")
        orr.limit_reset, orr.usage = None, 97.0
        with psycopg.connect(db_url) as conn:
            assert quotas.status(conn, config, now, provider="openrouter")[0].state == "critical"
        monkeypatch.setenv("TM_TEST_OPENROUTER_KEY", "sk-or-v1-wrong-key-that-is-secret")
        with psycopg.connect(db_url) as conn:
            bad = quotas.status(conn, config, now, provider="openrouter")[0]
    assert bad.state == "unknown" and "HTTP 401" in bad.error and "secret" not in bad.summary


# ------------------------------------------------------------------------------------------ the loop's asset

def _materialize(db_url, config_path, hour, sink, assets=(provider_quotas,)):
    return dg.materialize([requests_source, provider_quotas, routing_rules],
                          resources={"postgres": PostgresResource(url=db_url),
                                     "tm_config": TokenMachineConfig(path=str(config_path)), "posthog": sink},
                          partition_key=hour.strftime("%Y-%m-%d-%H:%M"), selection=[a.key for a in assets])


def test_the_asset_writes_each_hour_and_alerts_once_on_a_change_of_state(db_url, tmp_path):
    import yaml

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    log_steady(db_url, "anthropic", hour + timedelta(hours=1), 72, 1000)
    config = _config({"limit": 1_000_000, "reset": {"every": "monthly", "day": 1}})
    path = tmp_path / "tm.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with FakePostHog() as ph:
        sink = PostHogResource(api_key="phc_test", host=ph.url, sync=True)
        _materialize(db_url, path, hour - timedelta(hours=1), sink)
        with psycopg.connect(db_url, autocommit=True) as conn:
            quotas.set_usage(conn, config, "anthropic", "96%", now=hour)
        first = _materialize(db_url, path, hour, sink)
        _materialize(db_url, path, hour, sink)      # a re-run of the hour alerts no more
        alerts = query(db_url, "SELECT kind, subject, level, message FROM alerts")
        events = ph.wait_for(1)
    rows = query(db_url, "SELECT hour, provider, state FROM provider_quotas ORDER BY hour, provider")
    assert [(r["provider"], r["state"]) for r in rows] == [("anthropic", "ok"), ("local", "ok"),
                                                           ("anthropic", "critical"), ("local", "ok")]
    assert [(a["kind"], a["subject"], a["level"]) for a in alerts] == [("quota", "provider:anthropic", "critical")]
    assert alerts[0]["message"].startswith("anthropic: 96% used")
    assert [e["event"] for e in events] == ["tm_alert"]
    [mat] = first.asset_materializations_for_node("provider_quotas")
    forecasts = mat.metadata["forecasts"].value
    assert forecasts[0]["provider"] == "anthropic" and forecasts[0]["state"] == "critical"
    assert forecasts[0]["rate_per_h"] == pytest.approx(1000) and forecasts[0]["exhausts_in_h"] is not None


def test_the_loop_writes_a_shift_rule_for_a_critical_provider_in_the_mode_tm_mode_set(db_url, tmp_path):
    import yaml

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    log_steady(db_url, "anthropic", hour + timedelta(hours=1), 24, 1000)
    config = _config({"limit": 100_000, "reset": {"every": "monthly", "day": 1}})
    path = tmp_path / "tm.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with psycopg.connect(db_url, autocommit=True) as conn:
        quotas.set_usage(conn, config, "anthropic", "97%", now=hour)
    sink = PostHogResource(api_key=None)
    _materialize(db_url, path, hour, sink, (provider_quotas, routing_rules))
    rules = query(db_url, "SELECT rule_id, action, status, evidence FROM routing_rules WHERE hour = %s", (hour,))
    assert [(r["rule_id"], r["action"], r["status"]) for r in rules] == [("shift:anthropic", "shift", "active")]
    assert rules[0]["evidence"]["state"] == "critical" and rules[0]["evidence"]["used"] > 97_000
    with psycopg.connect(db_url, autocommit=True) as conn:
        quotas.set_loop_mode(conn, "dry-run")
    _materialize(db_url, path, hour, sink, (routing_rules,))
    assert query(db_url, "SELECT status FROM routing_rules WHERE hour = %s", (hour,)) == [{"status": "proposed"}]


# ------------------------------------------------------------------------------------------ decisions

def test_a_critical_provider_gets_a_shift_rule_governed_by_the_mode():
    q = pd.DataFrame([{"provider": "anthropic", "state": "critical", "used": 96.0, "quota_limit": 100.0,
                       "used_fraction": 0.96, "exhausts_at": None, "reset_at": pd.Timestamp("2026-12-01", tz="UTC"),
                       "summary": "anthropic: 96% used"},
                      {"provider": "ollama", "state": "warning", "used": 85.0, "quota_limit": 100.0,
                       "used_fraction": 0.85, "exhausts_at": None, "reset_at": None, "summary": "ollama: 85% used"}])
    for mode, status in (("auto", "active"), ("dry-run", "proposed"), ("manual", "inactive")):
        [d] = decide(None, None, None, None, Thresholds(), {}, mode, provider_quotas=q)
        assert (d.rule_id, d.action, d.status) == ("shift:anthropic", "shift", status)
        assert d.evidence["used_fraction"] == 0.96 and "96% used" in d.reason


def test_each_task_type_is_decided_on_its_own_quality_bar():
    pats = pd.DataFrame([("coding", "llama3.2", 30, 0.7), ("chat", "llama3.2", 30, 0.45)],
                        columns=["task_type", "model", "samples", "avg_quality"])
    tiers = {"llama3.2": "local", "claude": "included"}
    same = decide(pats, None, None, None, Thresholds(), tiers, frontier_model="claude")
    assert [d.rule_id for d in same] == ["escalate:chat", "cascade:coding"]
    own = Thresholds.model_validate({"task_types": {"coding": 0.8, "chat": {"escalate_below": 0.4, "lock_above": 0.44}}})
    got = decide(pats, None, None, None, own, tiers, frontier_model="claude")
    assert [d.rule_id for d in got] == ["escalate:coding", "lock_local:chat"]
    assert "under 0.80" in got[0].reason
    with pytest.raises(ValueError, match="must not be under escalate_below"):
        Thresholds.model_validate({"task_types": {"coding": {"escalate_below": 0.8, "lock_above": 0.5}}})


def test_tm_mode_overrides_the_configured_mode(db_url):
    config = _config()
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert quotas.loop_mode(conn, config) == ("auto", "tm.yaml loop.mode")
        quotas.set_loop_mode(conn, "dry-run")
        assert quotas.with_loop_mode(conn, config).loop.mode == "dry-run"
        with pytest.raises(ValueError, match="mode must be one of"):
            quotas.set_loop_mode(conn, "yolo")
