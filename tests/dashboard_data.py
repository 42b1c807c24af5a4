"""A team's traffic and the loop's tables for the dashboard's tests and bench/dashboard.py: request rows as the
gateway writes them (agents, models, routes, cache hits, fallbacks, errors), and grades, patterns and routing
rules as the loop writes them."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg
from psycopg.types.json import Jsonb

from tests.conftest import CLAUDE_PRICE, LOCAL_PRICE
from tm_gateway.ids import uuid7

# user -> (team, their agents). Two teams, so a customer's view can be checked against the other team's.
TEAM = {
    "alice": ("design", ("storyboard", "copywriter")),
    "bob": ("design", ("copywriter",)),
    "carol": ("platform", ("oncall-bot", "reviewer")),
    "dave": ("platform", ("reviewer",)),
}
MODELS = {"local-test": ("local", LOCAL_PRICE), "claude-test": ("anthropic", CLAUDE_PRICE)}
TASK_TYPES = ("coding", "writing", "summarize", "math")
ROUTES = ("tier:SIMPLE", "tier:COMPLEX", "rule:escalate:math", "rule:lock_local:coding", "default")


def _cost(price: dict, i: int, o: int, cr: int = 0) -> float:
    return (i * price["input"] + o * price["output"] + cr * price.get("cache_read", 0)) / 1e6


def request_rows(start: datetime, hours: int, per_hour: int, *, users: dict = TEAM, seed: int = 7,
                 fallback_model: str = "claude-test", fallback_share: float = 0.08) -> Iterator[dict]:
    """`per_hour` rows an hour for `hours` hours from `start`. The frontier model falls back on about
    `fallback_share` of its answers; a few requests fail and a few are cache hits."""
    rng = random.Random(seed)
    names = sorted(users)
    for h in range(hours):
        hour = start + timedelta(hours=h)
        for n in range(per_hour):
            user = names[rng.randrange(len(names))]
            agent = rng.choice(users[user][1])
            task = TASK_TYPES[(names.index(user) + n) % len(TASK_TYPES)] if rng.random() < 0.7 \
                else rng.choice(TASK_TYPES)
            local = task in ("coding", "summarize") or rng.random() < 0.3
            model = "local-test" if local else "claude-test"
            provider, price = MODELS[model]
            i, o = rng.randint(200, 4000), rng.randint(50, 1500)
            cached = rng.random() < 0.1
            status = 200 if rng.random() > 0.03 else rng.choice((429, 500, 502))
            fell_back = model == fallback_model and rng.random() < fallback_share
            attempts = [{"model": model, "provider": provider, "outcome": "ok"}]
            if fell_back:
                attempts.insert(0, {"model": model, "provider": provider, "failure": "rate_limited"})
            route = ("rule:lock_local:coding" if task == "coding" else "rule:escalate:math" if task == "math"
                     else "tier:SIMPLE" if local else "tier:COMPLEX")
            yield {
                "id": uuid7(), "ts": hour + timedelta(seconds=(3600 * n) // per_hour + rng.random()),
                "user_id": user, "api_key_id": "k_test", "api_format": "openai", "endpoint": "/v1/chat/completions",
                "agent": agent, "requested_model": "auto", "model": model, "provider": "cache" if cached else provider,
                "upstream_model": model, "stream": False, "prompt": f"{task} request {n}",
                "messages": json.dumps([{"role": "user", "content": f"{task} request {n}"}]), "params": "{}",
                "response_text": "ok" if status == 200 else None, "finish_reason": "stop",
                "input_tokens": 0 if cached else i, "output_tokens": 0 if cached else o,
                "cache_read_tokens": 0, "cache_write_tokens": 0,
                "cost_usd": 0.0 if cached or status != 200 else _cost(price, i, o),
                "baseline_cost_usd": _cost(CLAUDE_PRICE, i, o) if status == 200 else 0.0,
                "latency_ms": 0.0 if cached else rng.lognormvariate(6.5 if local else 7.3, 0.5),
                "status": status, "route": route, "route_reason": route, "task_type": task,
                "attempts": json.dumps(attempts), "cache_hit": "exact" if cached else None,
            }


def grade(quality: float) -> str:
    return next(g for g, bar in (("A", 0.85), ("B", 0.75), ("C", 0.65), ("D", 0.55), ("F", 0)) if quality >= bar)


def loop_tables(conn: psycopg.Connection, start: datetime, hours: int, *, users: dict = TEAM,
                run_id: str = "0f3c2a9e-1111-4a4a-9c9c-5e5e5e5e5e5e") -> None:
    """Grades, patterns and routing rules for each of the hours, as the loop writes them: an escalation applied
    from the first hour, a lock proposed then applied, a throttle applied then reverted, and a coaching brief."""
    names = sorted(users)
    with conn.transaction():
        for h in range(hours):
            hour = start + timedelta(hours=h)
            for k, user in enumerate(names):
                # spread across the grades, some people improving over the hours and some slipping
                q = min(0.97, max(0.3, 0.45 + 0.5 * ((k * 37) % 100) / 100 + (0.0005 if k % 3 else -0.0003) * h))
                conn.execute(
                    "INSERT INTO grades (hour, user_id, grade, avg_quality_score, samples, requests_today,"
                    " tokens_today, cost_today, wrong_model_rate, prompt_quality_avg, low_prompt_days,"
                    " coaching_example, prompt_weakness) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (hour, user, grade(q), q, 40, 50 + h,
                     10_000 * (k + 1), 0.5 * (k + 1), 0.05 * (k % 5), 0.35 if k == 0 else 0.7, 3 if k == 0 else 0,
                     "fix it" if k == 0 else None, "says what is wrong, not what is wanted" if k == 0 else None))
            for task in TASK_TYPES:
                for model in MODELS:
                    conn.execute(
                        "INSERT INTO patterns (hour, scope, task_type, model, tier, user_id, requests, samples,"
                        " avg_quality, total_cost_usd, avg_cost_usd, input_tokens, output_tokens, escalations,"
                        " escalated_away) VALUES (%s, 'type_model', %s, %s, %s, '', 30, 25, %s, 1.0, 0.04, 9000,"
                        " 3000, 0, 0)",
                        (hour, task, model, "local" if MODELS[model][0] == "local" else "included",
                         0.4 if (task == "math" and model == "local-test") else 0.85))
            rules = [("escalate:math", "escalate", "math", None, "active",
                      "local quality 0.40 over 25 samples is under 0.5: math goes to claude-test")]
            rules.append(("lock_local:coding", "lock_local", "coding", None, "proposed" if h < hours // 2 else "active",
                          "local quality 0.85 over 25 samples is over 0.8: coding stays local"))
            if h < hours // 3:
                rules.append(("throttle:dave", "throttle", None, "dave", "active",
                              "dave's hourly cost is 3.1x his baseline: local models only"))
            rules.append((f"coach:{names[0]}", "coach", None, names[0], "active",
                          f"{names[0]}'s prompt quality averaged 0.35 for 3 days (under 0.4)"))
            for rule_id, action, task, user, status, reason in rules:
                conn.execute(
                    "INSERT INTO routing_rules (hour, rule_id, action, task_type, user_id, model, target_model,"
                    " status, reason, evidence) VALUES (%s, %s, %s, %s, %s, 'local-test', 'claude-test', %s, %s, %s)",
                    (hour, rule_id, action, task, user, status, reason,
                     Jsonb({"local_samples": 25, "local_quality": 0.4 if task == "math" else 0.85})))
            conn.execute("INSERT INTO loop_runs (table_name, hour, run_id) VALUES ('routing_rules', %s, %s)"
                         " ON CONFLICT DO NOTHING", (hour, run_id))
