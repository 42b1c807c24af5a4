"""The dashboard's hourly roll-up (usage_hourly) against the request log it summarises, the run ids the loop
keeps for each hour, and the plain functions the dashboard builds its pages with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest

from tests.conftest import query
from tests.dashboard_data import request_rows
from tests.support import log_traffic, write_config
from tests.traffic import past_hour
from tm_assets.assets import loop_assets, requests_source
from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig, model_resources
from tm_assets.rollups import replace_team_usage_hour, replace_usage_hour
from tm_gateway.dashboard.queries import percentile_ms, rule_history
from tm_gateway.ids import uuid7
from tm_resources.config import load_config


@pytest.fixture
def two_hours(db_url, tmp_path):
    hour = past_hour(3)
    rows = list(request_rows(hour, 2, 60))
    # Rows that are not model calls (a models listing) stay out of the roll-up.
    rows.append({**rows[0], "id": uuid7(), "endpoint": "/v1/models", "model": None})
    log_traffic(db_url, tmp_path, rows)
    return hour, rows


def _config(tmp_path):
    return load_config(write_config(tmp_path))


def test_an_hour_rolls_up_to_the_same_totals_as_its_rows(db_url, tmp_path, two_hours):
    hour, rows = two_hours
    calls = [r for r in rows if r["endpoint"] == "/v1/chat/completions" and r["ts"] < hour + timedelta(hours=1)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        n = replace_usage_hour(conn, hour, _config(tmp_path))
    got = query(db_url, "SELECT * FROM usage_hourly")
    assert n == len(got) > 1
    assert {g["hour"] for g in got} == {hour}
    assert sum(g["requests"] for g in got) == len(calls)
    assert sum(g["cost_usd"] for g in got) == pytest.approx(sum(r["cost_usd"] for r in calls))
    assert sum(g["baseline_cost_usd"] for g in got) == pytest.approx(sum(r["baseline_cost_usd"] for r in calls))
    assert sum(g["input_tokens"] + g["output_tokens"] for g in got) == sum(
        r["input_tokens"] + r["output_tokens"] for r in calls)
    assert sum(g["errors"] for g in got) == sum(r["status"] >= 400 for r in calls)
    assert sum(g["cache_hits"] for g in got) == sum(r["cache_hit"] is not None for r in calls)
    assert sum(g["fallbacks"] for g in got) == sum(r["attempts"].count('"model"') > 1 for r in calls) > 0
    # Every request lands in exactly one latency bucket.
    assert all(sum(g["latency_buckets"]) == g["requests"] for g in got)
    by_model = {g["model"]: g["tier"] for g in got}
    assert by_model == {"local-test": "local", "claude-test": "included"}
    # The team roll-up is the same hour added up over users and task types.
    with psycopg.connect(db_url, autocommit=True) as conn:
        replace_team_usage_hour(conn, hour)
    team = query(db_url, "SELECT * FROM team_usage_hourly")
    assert len(team) < len(got)
    for column in ("requests", "errors", "fallbacks", "cache_hits", "input_tokens", "output_tokens"):
        assert sum(t[column] for t in team) == sum(g[column] for g in got), column
    assert sum(t["cost_usd"] for t in team) == pytest.approx(sum(g["cost_usd"] for g in got))
    assert [sum(b) for b in zip(*(t["latency_buckets"] for t in team), strict=True)] == \
        [sum(b) for b in zip(*(g["latency_buckets"] for g in got), strict=True)]
    alice_storyboard = sum(g["requests"] for g in got if (g["user_id"], g["agent"]) == ("alice", "storyboard"))
    assert alice_storyboard == sum((r["user_id"], r["agent"]) == ("alice", "storyboard") for r in calls) > 0


def test_rerunning_an_hour_replaces_it_and_leaves_other_hours(db_url, tmp_path, two_hours):
    hour, _ = two_hours
    config = _config(tmp_path)
    with psycopg.connect(db_url, autocommit=True) as conn:
        replace_usage_hour(conn, hour, config)
        replace_usage_hour(conn, hour + timedelta(hours=1), config)
        first = query(db_url, "SELECT * FROM usage_hourly ORDER BY hour, user_id, agent, model, route, task_type")
        replace_usage_hour(conn, hour, config)
    again = query(db_url, "SELECT * FROM usage_hourly ORDER BY hour, user_id, agent, model, route, task_type")
    assert again == first
    assert {g["hour"] for g in again} == {hour, hour + timedelta(hours=1)}


def test_the_loop_type_wins_over_the_gateway_one(db_url, tmp_path, two_hours):
    hour, rows = two_hours
    first = rows[0]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO task_types (hour, request_id, ts, user_id, model, task_type, confidence)"
                     " VALUES (%s, %s, %s, %s, %s, 'translation', 0.9)",
                     (hour, first["id"], first["ts"], first["user_id"], first["model"]))
        replace_usage_hour(conn, hour, _config(tmp_path))
    typed = query(db_url, "SELECT user_id, agent, model, requests FROM usage_hourly WHERE task_type = 'translation'")
    assert typed == [{"user_id": first["user_id"], "agent": first["agent"], "model": first["model"], "requests": 1}]


def test_the_asset_writes_its_hour_and_records_its_run(db_url, tmp_path, two_hours):
    hour, _ = two_hours
    result = dg.materialize(
        [requests_source, *loop_assets],
        selection=["usage_hourly", "team_usage_hourly"],
        resources={"postgres": PostgresResource(url=db_url),
                   "tm_config": TokenMachineConfig(path=str(write_config(tmp_path))),
                   "posthog": PostHogResource(api_key=None), **model_resources()},
        partition_key=hour.strftime("%Y-%m-%d-%H:%M"),
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("usage_hourly")
    rows = query(db_url, "SELECT count(*) AS n FROM usage_hourly WHERE hour = %s", (hour,))[0]["n"]
    assert mat.metadata["dagster/row_count"].value == rows > 0
    runs = query(db_url, "SELECT table_name, hour, run_id FROM loop_runs ORDER BY table_name")
    assert runs == [{"table_name": t, "hour": hour, "run_id": result.run_id}
                    for t in ("team_usage_hourly", "usage_hourly")]


def test_percentiles_come_from_the_buckets():
    assert percentile_ms([0] * 16, 0.5) is None
    buckets = [0] * 16
    buckets[7] = 90   # [64, 128) ms
    buckets[11] = 10  # [1024, 2048) ms
    assert percentile_ms(buckets, 0.5) == 128
    assert percentile_ms(buckets, 0.95) == 2048


def test_the_history_names_each_change_of_a_rule():
    h = [datetime(2026, 11, 1, i, tzinfo=UTC) for i in range(4)]
    hours = [{"hour": x, "run_id": f"run{i}"} for i, x in enumerate(h)]

    def rule(i, rule_id, status):
        return {"hour": h[i], "rule_id": rule_id, "action": rule_id.split(":")[0], "status": status,
                "reason": f"{rule_id} at {i}", "run_id": f"run{i}"}

    rows = [rule(0, "lock_local:coding", "proposed"), rule(0, "throttle:dave", "active"),
            rule(1, "lock_local:coding", "active"), rule(1, "throttle:dave", "active"),
            rule(2, "lock_local:coding", "active"),
            # hour 3 wrote no rule at all: everything in force is reverted
            ]
    events = [(e["hour"], e["rule_id"], e["event"], e["run_id"]) for e in rule_history(rows, hours)]
    assert events == [
        (h[3], "lock_local:coding", "reverted", "run3"),
        (h[2], "throttle:dave", "reverted", "run2"),
        (h[1], "lock_local:coding", "applied", "run1"),
        (h[0], "lock_local:coding", "proposed", "run0"),
        (h[0], "throttle:dave", "applied", "run0"),
    ]
