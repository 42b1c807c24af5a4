"""What each dashboard page shows, read from the loop's roll-ups (never the raw request log), with the
viewer's scope in the SQL itself: a customer's queries name their own users, whatever the URL says."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

# Latency bucket i of usage_hourly holds [2^(i-1), 2^i) ms: a percentile is reported as its bucket's top.
LATENCY_BUCKETS = 16

# The tables the limits page reads; it is offered once one of them exists (migrations 0014, 0016).
LIMITS_TABLES = ("budgets", "budget_usage", "provider_quotas")


@dataclass(frozen=True)
class Scope:
    """Whose usage a query may read: None for the whole team (admin keys), else exactly these users."""

    users: tuple[str, ...] | None

    def sql(self, column: str = "user_id") -> tuple[str, dict[str, Any]]:
        if self.users is None:
            return "true", {}
        return f"{column} = ANY(%(scope_users)s)", {"scope_users": list(self.users)}


def since(days: int, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(days=days) + timedelta(hours=1)


async def _all(conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cur = await conn.cursor(row_factory=dict_row).execute(sql, params)
    return await cur.fetchall()


def percentile_ms(buckets: list[int], q: float) -> float | None:
    """The upper edge of the bucket holding the q-th quantile (within a factor of two of the true value)."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= q * total:
            return float(2 ** i)
    return float(2 ** (len(buckets) - 1))


def _usage_where(scope: Scope, start: datetime) -> tuple[str, dict[str, Any]]:
    """The roll-up to read and its WHERE: everyone's usage from team_usage_hourly (no user column, a few times
    fewer rows), a few users' from usage_hourly through its (user_id, hour) index."""
    if scope.users is None:
        return "team_usage_hourly WHERE hour >= %(since)s", {"since": start}
    clause, params = scope.sql()
    return f"usage_hourly WHERE hour >= %(since)s AND {clause}", {"since": start, **params}


_TOKENS = "input_tokens + output_tokens + cache_read_tokens + cache_write_tokens"
# The latency buckets summed element by element by subscript: several times faster than unnesting them.
_BUCKET_SUMS = ", ".join(f"sum(latency_buckets[{i + 1}]) AS b{i}" for i in range(LATENCY_BUCKETS))
_COUNTS = ("requests", "errors", "fallbacks", "cache_hits", "tokens")
_SUMS = ("cost", "baseline", "latency_sum")


def _rate(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


async def usage(conn: psycopg.AsyncConnection, scope: Scope, start: datetime) -> dict[str, Any]:
    """Spend against the all-frontier baseline, tokens, cache, fallbacks, errors and routes of `scope` since
    `start`: what the team overview (scope: everyone) and the customer view (scope: their users) draw.
    Two scans of the roll-up; the rest is added up here."""
    where, p = _usage_where(scope, start)
    by_hour_model = await _all(conn, f"""
        SELECT hour, model, max(tier) AS tier, sum(requests) AS requests, sum(errors) AS errors,
               sum(fallbacks) AS fallbacks, sum(cache_hits) AS cache_hits, sum({_TOKENS}) AS tokens,
               sum(cost_usd) AS cost, sum(baseline_cost_usd) AS baseline, sum(latency_ms_sum) AS latency_sum,
               {_BUCKET_SUMS}
        FROM {where} GROUP BY hour, model ORDER BY hour, model""", p)
    # One scan, two groupings, without the latency buckets (they would double its cost).
    rows = await _all(conn, f"""
        SELECT GROUPING(agent, hod) = 0 AS by_agent, agent, hod, route, sum(requests) AS requests,
               sum({_TOKENS}) AS tokens, sum(cost_usd) AS cost
        FROM (SELECT *, extract(hour FROM hour AT TIME ZONE 'UTC')::int AS hod FROM {where}) u
        GROUP BY GROUPING SETS ((agent, hod), (route))""", p)
    by_agent = [r for r in rows if r["by_agent"]]
    routes: list[dict[str, Any]] = sorted(
        ({"route": r["route"] or "(none)", "requests": int(r["requests"])} for r in rows if not r["by_agent"]),
        key=lambda r: -r["requests"])

    def blank() -> dict[str, Any]:
        return {**dict.fromkeys(_COUNTS, 0), **dict.fromkeys(_SUMS, 0.0)}

    totals = blank()
    hours: dict[str, dict[str, Any]] = {}
    days: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    tiers: dict[tuple[str, str], float] = {}
    buckets: dict[str, list[int]] = {}
    # Tokens by hour of the day (UTC), so a month's heat map stays 24 columns wide.
    tokens_by: dict[str, dict[tuple[str, int], int]] = {"agent": {}, "model": {}}
    for r in by_hour_model:
        model = r["model"] or "(none: refused before a model)"
        hour, day = r["hour"].isoformat(), r["hour"].strftime("%Y-%m-%d")
        m = models.setdefault(model, {"model": model, "tier": r["tier"], **blank()})
        for acc in (totals, hours.setdefault(hour, blank()), days.setdefault(day, blank()), m):
            for k in _COUNTS:
                acc[k] += int(r[k])
            for k in _SUMS:
                acc[k] += float(r[k] or 0)
        key = (day, r["tier"] or "(none)")
        tiers[key] = tiers.get(key, 0.0) + float(r["cost"])
        b = buckets.setdefault(model, [0] * LATENCY_BUCKETS)
        for i in range(LATENCY_BUCKETS):
            b[i] += int(r[f"b{i}"] or 0)
        cell = (model, r["hour"].hour)
        tokens_by["model"][cell] = tokens_by["model"].get(cell, 0) + int(r["tokens"])
    agents: dict[str, dict[str, Any]] = {}
    for r in by_agent:
        name = r["agent"] or "(none)"
        a = agents.setdefault(name, {"agent": name, "requests": 0, "tokens": 0, "cost": 0.0})
        a["requests"] += int(r["requests"])
        a["tokens"] += int(r["tokens"])
        a["cost"] += float(r["cost"])
        tokens_by["agent"][(name, r["hod"])] = int(r["tokens"])

    totals["saving"] = totals["baseline"] - totals["cost"]
    totals["saving_pct"] = 100 * _rate(totals["saving"], totals["baseline"])
    for k in ("cache_hit", "error", "fallback"):
        totals[f"{k}_rate"] = _rate(totals[k + "s"], totals["requests"])
    for m in models.values():
        n = m["requests"]
        m.update(error_rate=_rate(m["errors"], n), fallback_rate=_rate(m["fallbacks"], n),
                 latency_avg_ms=m.pop("latency_sum") / n if n else None,
                 latency_p50_ms=percentile_ms(buckets[m["model"]], 0.5),
                 latency_p95_ms=percentile_ms(buckets[m["model"]], 0.95))
    return {
        "totals": totals,
        "by_hour": [{"hour": h, "cost": v["cost"], "baseline": v["baseline"]} for h, v in hours.items()],
        "by_day": [{"day": d, "cost": v["cost"], "baseline": v["baseline"], "requests": v["requests"],
                    "cache_hits": v["cache_hits"]} for d, v in days.items()],
        "tokens_by": {dim: [{"name": name, "hour": h, "tokens": n} for (name, h), n in sorted(cells.items())]
                      for dim, cells in tokens_by.items()},
        "models": sorted(models.values(), key=lambda m: -m["requests"]),
        "routes": routes,
        "agents": sorted(agents.values(), key=lambda a: -a["requests"]),
        "cost_by_tier": [{"day": d, "tier": t, "cost": c} for (d, t), c in sorted(tiers.items())],
    }


async def grades(conn: psycopg.AsyncConnection, scope: Scope, start: datetime) -> dict[str, Any]:
    """The newest hour's A-F leaderboard, each person's daily quality since `start`, and the coaching briefs."""
    clause, p = scope.sql()
    p = {**p, "since": start}
    board = await _all(conn, f"""
        SELECT user_id, grade, avg_quality_score, samples, requests_today, tokens_today, cost_today,
               wrong_model_rate, prompt_quality_avg, low_prompt_days, coaching_example, prompt_weakness, hour
        FROM grades WHERE hour = (SELECT max(hour) FROM grades) AND {clause}
        ORDER BY avg_quality_score DESC NULLS LAST, user_id""", p)
    daily = await _all(conn, f"""
        SELECT user_id, date_trunc('day', hour) AS day, avg(avg_quality_score) AS quality
        FROM grades WHERE hour >= %(since)s AND {clause} GROUP BY 1, 2 ORDER BY 1, 2""", p)
    trend: dict[str, list[dict[str, Any]]] = {}
    for r in daily:
        trend.setdefault(r["user_id"], []).append(
            {"day": r["day"].strftime("%Y-%m-%d"), "quality": None if r["quality"] is None else float(r["quality"])})
    for row in board:
        points = [t["quality"] for t in trend.get(row["user_id"], []) if t["quality"] is not None]
        row["trend"] = points[-1] - points[0] if len(points) > 1 else None
        row["hour"] = row["hour"].isoformat()
    return {"leaderboard": board, "trend": trend}


async def coaching(conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
    return await _all(conn, """
        SELECT r.user_id, r.reason, r.evidence, g.coaching_example, g.prompt_weakness
        FROM routing_rules r LEFT JOIN grades g ON g.hour = r.hour AND g.user_id = r.user_id
        WHERE r.hour = (SELECT max(hour) FROM routing_rules) AND r.action = 'coach' ORDER BY r.user_id""", {})


async def quality_by_type_model(conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
    rows = await _all(conn, """
        SELECT task_type, model, samples, avg_quality FROM patterns
        WHERE hour = (SELECT max(hour) FROM patterns) AND scope = 'type_model' AND samples > 0
        ORDER BY task_type, model""", {})
    return [{**r, "avg_quality": None if r["avg_quality"] is None else float(r["avg_quality"])} for r in rows]


async def rules(conn: psycopg.AsyncConnection, start: datetime) -> dict[str, Any]:
    """The rules of the newest hour (what the gateway obeys), their history since `start`, and the Dagster
    run that wrote each hour."""
    in_force = await _all(conn, """
        SELECT r.hour, r.rule_id, r.action, r.status, r.task_type, r.user_id, r.model, r.target_model, r.reason,
               r.evidence, l.run_id
        FROM routing_rules r LEFT JOIN loop_runs l ON l.table_name = 'routing_rules' AND l.hour = r.hour
        WHERE r.hour = (SELECT max(hour) FROM routing_rules) AND r.status IN ('active', 'proposed')
        ORDER BY r.action, r.rule_id""", {})
    rows = await _all(conn, """
        SELECT r.hour, r.rule_id, r.action, r.status, r.reason, l.run_id
        FROM routing_rules r LEFT JOIN loop_runs l ON l.table_name = 'routing_rules' AND l.hour = r.hour
        WHERE r.hour >= %(since)s ORDER BY r.hour, r.rule_id""", {"since": start})
    hours = await _all(conn, """
        SELECT h.hour, l.run_id FROM (
            SELECT hour FROM routing_rules WHERE hour >= %(since)s
            -- an hour whose run decided nothing has no rule rows, only its run
            UNION SELECT hour FROM loop_runs WHERE table_name = 'routing_rules' AND hour >= %(since)s) h
        LEFT JOIN loop_runs l ON l.table_name = 'routing_rules' AND l.hour = h.hour ORDER BY h.hour""",
                       {"since": start})
    return {"in_force": in_force, "history": rule_history(rows, hours)}


# What a rule's status means for the team, as the history names it.
_EVENT = {"active": "applied", "proposed": "proposed", "inactive": "computed (manual mode)"}


def rule_history(rows: list[dict[str, Any]], hours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rule's changes from one loop hour to the next, newest first: proposed, applied, computed in manual
    mode, and reverted (an applied rule the next run no longer wrote) or withdrawn (a proposal dropped).
    `rows`: (hour, rule_id, action, status, reason, run_id) ordered by hour; `hours`: every hour that wrote rules."""
    by_hour: dict[datetime, dict[str, dict[str, Any]]] = {h["hour"]: {} for h in hours}
    for r in rows:
        by_hour.setdefault(r["hour"], {})[r["rule_id"]] = r
    runs = {h["hour"]: h["run_id"] for h in hours}
    events: list[dict[str, Any]] = []
    before: dict[str, dict[str, Any]] = {}
    for hour in sorted(by_hour):
        now = by_hour[hour]
        for rule_id, r in now.items():
            was = before.get(rule_id)
            if was is None or was["status"] != r["status"]:
                events.append({"hour": hour, "rule_id": rule_id, "action": r["action"], "event": _EVENT.get(
                    r["status"], r["status"]), "reason": r["reason"], "run_id": r["run_id"]})
        for rule_id, was in before.items():
            if rule_id not in now:
                events.append({"hour": hour, "rule_id": rule_id, "action": was["action"],
                               "event": "reverted" if was["status"] == "active" else "withdrawn",
                               "reason": "no longer warranted by the loop's evidence", "run_id": runs.get(hour)})
        before = now
    events.sort(key=lambda e: e["rule_id"])
    events.sort(key=lambda e: e["hour"], reverse=True)  # stable: newest hour first, rules by name within it
    return events


async def provider_quotas(conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
    """Each provider's quota as the loop's provider_quotas asset last wrote it (its newest hour): what `tm status`
    computes live, read here from the hourly table so the page does not scan the log."""
    return await _all(conn, """
        SELECT DISTINCT ON (provider) hour, provider, quota_type AS unit, used, quota_limit AS "limit", used_fraction,
            rate_per_h, state, summary
        FROM provider_quotas ORDER BY provider, hour DESC""", {})


async def billing(conn: psycopg.AsyncConnection, scope: Scope, start: datetime) -> dict[str, float]:
    """What `scope`'s requests since `start` cost and were billed, by billing (included / overage / premium /
    local): from usage_hourly, so it needs the users named (the customer view)."""
    clause, params = scope.sql()
    rows = await _all(conn, f"""
        SELECT COALESCE(sum(included_cost_usd), 0) AS included_cost, COALESCE(sum(included_billed_usd), 0) AS included,
            COALESCE(sum(overage_billed_usd), 0) AS overage, COALESCE(sum(premium_billed_usd), 0) AS premium,
            COALESCE(sum(local_billed_usd), 0) AS local
        FROM usage_hourly WHERE hour >= %(since)s AND {clause}""", {"since": start, **params})
    return {k: float(v) for k, v in rows[0].items()}


async def grade_of(conn: psycopg.AsyncConnection, user: str) -> dict[str, Any] | None:
    rows = await _all(conn, """
        SELECT grade, avg_quality_score, prompt_weakness FROM grades
        WHERE user_id = %(user)s AND hour = (SELECT max(hour) FROM grades WHERE user_id = %(user)s)""",
                      {"user": user})
    return rows[0] if rows else None


async def limits_tables(conn: psycopg.AsyncConnection) -> list[str]:
    rows = await _all(conn, "SELECT name FROM unnest(%(names)s::text[]) AS name WHERE to_regclass(name) IS NOT NULL",
                      {"names": list(LIMITS_TABLES)})
    return [r["name"] for r in rows]


async def alerts(conn: psycopg.AsyncConnection, limit: int = 50) -> list[dict[str, Any]]:
    return await _all(conn, "SELECT ts, kind, subject, level, message FROM alerts ORDER BY ts DESC LIMIT %(n)s",
                      {"n": limit})
