"""Scored traffic seeded straight into the request log and the loop's tables, for the operator's commands
(tm analyze / optimize / providers and the MCP tools) to read from a real Postgres."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import yaml

from tests.conftest import make_config
from tm_resources.config import Config

# Routed by the machine (auto), of one task type, on one model: (user, agent, requested, model, type,
# qualities). Tokens are 1000 in, 500 out each.
TRAFFIC = [
    # the coder agent's coding goes to claude-test (its configured model) ...
    *[("alice", "coder", "auto", "claude-test", "coding", q) for q in [0.78, 0.82] * 13],
    # ... while local-test serves bob's coding as well, on plenty of samples: a safe move
    *[("bob", None, "auto", "local-test", "coding", q) for q in [0.79, 0.83] * 13],
    # carol's writing on claude-test; local-test's writing is as good but on few samples: not safe
    *[("carol", None, "tm:fast", "claude-test", "writing", 0.80) for _ in range(8)],
    *[("dave", None, "auto", "local-test", "writing", 0.80) for _ in range(6)],
    # erin names claude-test herself: no override can move that
    *[("erin", None, "claude-test", "claude-test", "coding", 0.80) for _ in range(10)],
]
IN_TOKENS, OUT_TOKENS = 1000, 500


def ops_config(anthropic_url: str = "http://127.0.0.1:9", openai_url: str = "http://127.0.0.1:9/v1",
               **overrides) -> Config:
    return make_config(anthropic_url, openai_url, agents={"coder": {"model": "claude-test"}},
                       presets={"tm:fast": ["claude-test", "local-test"]}, **overrides)


def write_ops_config(path, config: Config) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return str(path)


def seed(db_url: str, config: Config, traffic=TRAFFIC, *, start: datetime | None = None) -> datetime:
    """Log and score the traffic, one request a minute from `start` (default a day ago); returns start."""
    start = start or datetime.now(UTC) - timedelta(days=1)
    with psycopg.connect(db_url) as conn:
        for i, (user, agent, requested, model, task_type, quality) in enumerate(traffic):
            rid, ts = uuid.uuid4(), start + timedelta(minutes=i)
            hour = ts.replace(minute=0, second=0, microsecond=0)
            cost = config.models[model].price.cost(IN_TOKENS, OUT_TOKENS)
            conn.execute(
                "INSERT INTO requests (id, ts, user_id, api_format, endpoint, agent, requested_model, model, provider,"
                " input_tokens, output_tokens, cost_usd, latency_ms, status, route, task_type, prompt, response_text)"
                " VALUES (%s, %s, %s, 'openai', '/v1/chat/completions', %s, %s, %s, %s, %s, %s, %s, 1000, 200,"
                " 'default', %s, 'q', 'a')",
                (rid, ts, user, agent, requested, model, config.models[model].provider, IN_TOKENS, OUT_TOKENS, cost,
                 task_type))
            tier = config.models[model].tier.value
            conn.execute("INSERT INTO scored_requests (hour, request_id, ts, user_id, model, tier, quality)"
                         " VALUES (%s, %s, %s, %s, %s, %s, %s)", (hour, rid, ts, user, model, tier, quality))
            conn.execute("INSERT INTO task_types (hour, request_id, ts, user_id, model, task_type, confidence)"
                         " VALUES (%s, %s, %s, %s, %s, %s, 0.9)", (hour, rid, ts, user, model, task_type))
    return start


def cost(config: Config, model: str, n: int) -> float:
    return n * config.models[model].price.cost(IN_TOKENS, OUT_TOKENS)
