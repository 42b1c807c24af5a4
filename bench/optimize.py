"""Benchmark: what the operator's commands cost. `tm analyze`'s query and analysis over a week of scored requests
(the code `tm analyze`, `tm optimize` and the MCP tools run), and the gateway's route decision with a book of
operator overrides against one without.

    .venv/bin/python bench/optimize.py [--requests 100000] [--overrides 1000]

Runs on its own embedded Postgres in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ["coding", "math", "writing", "summarization", "extraction", "chat", "reasoning"]

# A week of traffic from 200 users and 20 agents over the example config's models, scored and typed.
SEED_SQL = """
CREATE TEMP TABLE gen AS
SELECT gen_random_uuid() AS id, %(now)s::timestamptz - (i * (604800.0 / %(n)s)) * interval '1 second' AS ts,
       'u' || (i %% 200) AS user_id, CASE WHEN i %% 3 = 0 THEN 'agent' || (i %% 20) END AS agent,
       (ARRAY['auto', 'auto', 'tm:balanced', 'claude-sonnet-5-5'])[1 + i %% 4] AS requested_model,
       (ARRAY['llama3.2', 'claude-haiku-5-5', 'claude-sonnet-5-5', 'qwen2.5-coder'])[1 + (i / 7) %% 4] AS model,
       (%(types)s::text[])[1 + i %% 7] AS task_type, 0.5 + random() * 0.5 AS quality
FROM generate_series(1, %(n)s) i
---
INSERT INTO requests (id, ts, user_id, api_format, endpoint, agent, requested_model, model, input_tokens,
                      output_tokens, cost_usd, latency_ms, status)
SELECT id, ts, user_id, 'openai', '/v1/chat/completions', agent, requested_model, model, 800, 300,
       CASE WHEN model LIKE 'claude%%' THEN 0.0069 ELSE 0 END, 900, 200 FROM gen
---
INSERT INTO scored_requests (hour, request_id, ts, user_id, model, tier, quality)
SELECT date_trunc('hour', ts), id, ts, user_id, model, 'x', quality FROM gen
---
INSERT INTO task_types (hour, request_id, ts, user_id, model, task_type, confidence)
SELECT date_trunc('hour', ts), id, ts, user_id, model, task_type, 0.9 FROM gen;
"""


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--overrides", type=int, default=1000)
    ap.add_argument("--lookups", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import psycopg

    from tm_gateway.rules import Rule, RuleBook, route_request
    from tm_resources import db
    from tm_resources.config import EXAMPLE_CONFIG, load_config
    from tm_resources.optimize import read_scored, run_analysis

    config = load_config(EXAMPLE_CONFIG)
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="tm-bench-optimize-") as home:
        url = db.ensure_database(db.start_embedded(Path(home)), "bench")
        db.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            t = time.perf_counter()
            for statement in SEED_SQL.split("---"):
                conn.execute(statement, {"now": now, "n": args.requests, "types": TYPES})
            for table in ("requests", "scored_requests", "task_types"):
                conn.execute(f"ANALYZE {table}")
            seed_s = time.perf_counter() - t
            reads, runs = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                df = read_scored(conn, now - timedelta(days=config.optimize.window_days), now)
                reads.append(time.perf_counter() - t)
                t = time.perf_counter()
                analysis = run_analysis(conn, config, now=now)
                runs.append(time.perf_counter() - t)
    assert len(df) == args.requests

    # The gateway's decision: a user's `auto` request under a book with no override, then with many
    # (agents and users across every type), some of them matching.
    users = [f"u{i}" for i in range(200)]
    overrides = [Rule(f"op-{i}", "override", TYPES[i % 7], None if i % 2 else users[i % 200], None, "llama3.2", "r",
                      f"agent{i % 20}" if i % 2 else None) for i in range(args.overrides)]
    timings = {}
    for name, book in (("no_overrides", RuleBook()), (f"{args.overrides}_overrides", RuleBook.from_rules([], None,
                                                                                                          overrides))):
        samples = []
        for i in range(args.lookups):
            t = time.perf_counter()
            route_request("auto", TYPES[i % 7], users[i % 200], book, config, agent=f"agent{i % 20}" if i % 3 else None)
            samples.append(time.perf_counter() - t)
        timings[name] = percentiles(samples)

    figures = {
        "scored_requests": args.requests,
        "seed_s": round(seed_s, 2),
        "read_scored_s": round(min(reads), 3),
        "analysis_total_s": round(min(runs), 3),
        "opportunities": len(analysis.opportunities),
        "route_request": timings,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
