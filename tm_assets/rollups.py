"""The dashboard's hourly roll-up of the request log (usage_hourly), and the run that wrote each loop hour."""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg
from psycopg.types.json import Jsonb

from tm_resources.config import Config
from tm_resources.tables import COMPLETION_ENDPOINTS

# Bucket i counts latencies in [2^(i-1), 2^i) ms; bucket 0 is under 1 ms and the last is open-ended.
LATENCY_BUCKETS = 16

_BUCKET = f"LEAST({LATENCY_BUCKETS - 1}, GREATEST(0, floor(log(2, GREATEST(r.latency_ms, 0.5)::numeric)) + 1))::int"

USAGE_SQL = f"""
INSERT INTO usage_hourly (hour, user_id, agent, model, tier, route, task_type, requests, errors, fallbacks,
    cache_hits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, baseline_cost_usd,
    latency_ms_sum, latency_buckets, included_cost_usd, included_billed_usd, overage_billed_usd, premium_billed_usd,
    local_billed_usd)
SELECT %(hour)s, user_id, agent, model, COALESCE(%(tiers)s::jsonb ->> model, ''), route, task_type,
    count(*), count(*) FILTER (WHERE status >= 400), count(*) FILTER (WHERE fell_back), count(*) FILTER (WHERE cached),
    sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens),
    sum(cost_usd), sum(baseline_cost_usd), sum(latency_ms),
    ARRAY[{", ".join(f"count(*) FILTER (WHERE bucket = {i})" for i in range(LATENCY_BUCKETS))}],
    COALESCE(sum(cost_usd) FILTER (WHERE billing = 'included'), 0),
    {", ".join(f"COALESCE(sum(billed_usd) FILTER (WHERE billing = '{b}'), 0)"
               for b in ("included", "overage", "premium", "local"))}
FROM (
    SELECT r.user_id, COALESCE(r.agent, '') AS agent, COALESCE(r.model, '') AS model, COALESCE(r.route, '') AS route,
        COALESCE(t.task_type, r.task_type, '') AS task_type, r.status,
        jsonb_typeof(r.attempts) = 'array' AND jsonb_array_length(r.attempts) > 1 AS fell_back,
        r.cache_hit IS NOT NULL AS cached,
        r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, r.cost_usd,
        -- without a frontier model configured there is no baseline: the request then saved nothing
        COALESCE(r.baseline_cost_usd, r.cost_usd) AS baseline_cost_usd,
        COALESCE(r.latency_ms, 0) AS latency_ms, {_BUCKET} AS bucket, r.billing, r.billed_usd
    FROM requests r LEFT JOIN task_types t ON t.request_id = r.id
    WHERE r.ts >= %(hour)s AND r.ts < %(end)s AND r.endpoint = ANY(%(endpoints)s)
) r
GROUP BY user_id, agent, model, route, task_type
"""


TEAM_USAGE_SQL = f"""
INSERT INTO team_usage_hourly (hour, agent, model, tier, route, requests, errors, fallbacks, cache_hits, input_tokens,
    output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, baseline_cost_usd, latency_ms_sum, latency_buckets)
SELECT hour, agent, model, max(tier), route, sum(requests), sum(errors), sum(fallbacks), sum(cache_hits),
    sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd),
    sum(baseline_cost_usd), sum(latency_ms_sum),
    ARRAY[{", ".join(f"sum(latency_buckets[{i + 1}])" for i in range(LATENCY_BUCKETS))}]::integer[]
FROM usage_hourly WHERE hour = %(hour)s
GROUP BY hour, agent, model, route
"""


def replace_usage_hour(conn: psycopg.Connection, hour: datetime, config: Config) -> int:
    """Roll up the model calls of `hour` into usage_hourly, replacing that hour whole; returns its row count."""
    tiers = {name: m.tier.value for name, m in config.models.items()}
    with conn.transaction():
        conn.execute("DELETE FROM usage_hourly WHERE hour = %s", (hour,))
        cur = conn.execute(USAGE_SQL, {"hour": hour, "end": hour + timedelta(hours=1), "tiers": Jsonb(tiers),
                                       "endpoints": list(COMPLETION_ENDPOINTS)})
    return cur.rowcount


def record_loop_run(conn: psycopg.Connection, table: str, hour: datetime, run_id: str) -> None:
    """Remember which Dagster run wrote `table`'s `hour`, so the dashboard can link a rule to its run."""
    conn.execute("INSERT INTO loop_runs (table_name, hour, run_id) VALUES (%s, %s, %s)"
                 " ON CONFLICT (table_name, hour) DO UPDATE SET run_id = EXCLUDED.run_id, written_at = now()",
                 (table, hour, run_id))


def replace_team_usage_hour(conn: psycopg.Connection, hour: datetime) -> int:
    """Add up usage_hourly's `hour` over users and task types into team_usage_hourly, replacing that hour."""
    with conn.transaction():
        conn.execute("DELETE FROM team_usage_hourly WHERE hour = %s", (hour,))
        cur = conn.execute(TEAM_USAGE_SQL, {"hour": hour})
    return cur.rowcount
