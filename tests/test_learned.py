"""The learned router fitted to the request log (tm_gateway/learned.py), and the gateway's state
holding it (tm_gateway/state.py): real Postgres, real MiniLM vectors."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pgvector.psycopg import register_vector

from tests.traffic import CODING_TASKS, MATH_QUESTIONS, coding_prompt, math_prompt
from tm_gateway import state as state_module
from tm_gateway.ids import uuid7
from tm_gateway.learned import LearnedRouter, RouterSettings, load_router
from tm_gateway.state import SharedState
from tm_resources.db import connect
from tm_resources.embedder import get_embedder

A, B = "local-a", "local-b"
NOW = datetime.now(UTC).replace(microsecond=0)
CODING = [coding_prompt(i) for i in range(len(CODING_TASKS))]
MATH = [math_prompt(i) for i in range(len(MATH_QUESTIONS))]
# New prompts, not in the log.
NEW_CODING = "Write a Python function that returns the median of a list of numbers."
NEW_MATH = "What is the integral of sin(x) from 0 to pi?"


@pytest.fixture(scope="module")
def vec():
    embedder = get_embedder()
    cache: dict[str, np.ndarray] = {}

    def of(text: str) -> np.ndarray:
        if text not in cache:
            cache[text] = embedder.embed_one(text)
        return cache[text]

    return of


def log_scored(db_url: str, vec, rows: list[tuple[str, str, float]], *, ts: datetime = NOW - timedelta(hours=2),
               provider: str = "local", cost: float = 0.001, vector_in: str = "scored") -> None:
    """(prompt, model, quality) rows as the gateway logs them and the loop scores them. vector_in:
    where the prompt's vector is ('scored', 'requests': the gateway's only, or 'none')."""
    with connect(db_url) as conn:
        register_vector(conn)
        with conn.cursor() as cur:
            for i, (prompt, model, quality) in enumerate(rows):
                rid, at = uuid7(), ts - timedelta(seconds=i)
                v = vec(prompt)
                cur.execute(
                    "INSERT INTO requests (id, ts, user_id, api_format, endpoint, requested_model, model, provider,"
                    " prompt, response_text, status, cost_usd, prompt_embedding)"
                    " VALUES (%s, %s, 'alice', 'openai', '/v1/chat/completions', 'auto', %s, %s, %s, 'ok', 200,"
                    " %s, %s)",
                    (rid, at, model, provider, prompt, cost, v if vector_in == "requests" else None))
                cur.execute(
                    "INSERT INTO scored_requests (hour, request_id, ts, user_id, model, quality, prompt_embedding)"
                    " VALUES (date_trunc('hour', %s::timestamptz), %s, %s, 'alice', %s, %s, %s)",
                    (at, rid, at, model, quality, v if vector_in == "scored" else None))


def topic_traffic(a_coding: float = 0.9, a_math: float = 0.2, b_coding: float = 0.3, b_math: float = 0.85,
                  n: int = 20) -> list[tuple[str, str, float]]:
    """Both models answer every prompt (n of each topic): A is good at coding and poor at math, B the
    reverse."""
    rows = []
    for p in CODING[:n]:
        rows += [(p, A, a_coding), (p, B, b_coding)]
    for p in MATH[:n]:
        rows += [(p, A, a_math), (p, B, b_math)]
    return rows


def load(db_url: str, **kw) -> LearnedRouter:
    kw.setdefault("models", [A, B])
    with connect(db_url) as conn:
        return load_router(conn, now=NOW, **kw)


def test_it_learns_which_model_answers_which_topic(db_url, vec):
    rows = topic_traffic()
    # Coding rows carry the loop's vector; math rows only the gateway's (scored_requests has none).
    log_scored(db_url, vec, [r for r in rows if r[0] in CODING], cost=0.001)
    log_scored(db_url, vec, [r for r in rows if r[0] in MATH], cost=0.001, vector_in="requests")
    # Rows without any vector cannot be placed: left out.
    log_scored(db_url, vec, [(CODING[0], B, 1.0)] * 5, vector_in="none")

    learned = load(db_url)
    assert learned.ready, learned.reason
    assert learned.arms == (A, B)
    assert learned.rows == len(rows) == 80
    assert learned.rows_per_model == {A: 40, B: 40}
    assert learned.loaded_at == NOW and learned.window_h == 168
    assert "80 scored requests of 2 models" in learned.reason

    coding = learned.choose(vec(NEW_CODING))
    math = learned.choose(vec(NEW_MATH))
    assert (coding.arm, math.arm) == (A, B)
    # A wide neighbourhood (every row counts here) over MiniLM vectors keeps the estimates near the
    # models' means (0.55 and 0.575), but the margin is clear.
    (qc,), _ = learned.router.predict(vec(NEW_CODING))
    (qm,), _ = learned.router.predict(vec(NEW_MATH))
    assert qc[0] - qc[1] > 0.1 and qm[1] - qm[0] > 0.1, (qc, qm)
    # The defaults are router.py's (a wide neighbourhood: every one of these 80 rows counts).
    assert (learned.router.k, learned.router.temperature, learned.router.prior_weight) == (200, 0.3, 2.0)

    # Only allowed models are chosen; none of them known: no choice, not an error.
    assert learned.choose(vec(NEW_CODING), allowed=[B, "claude-test"]).arm == B
    assert learned.choose(vec(NEW_CODING), allowed=["claude-test"]) is None
    assert learned.choose(vec(NEW_CODING), allowed=[]) is None
    assert learned.choose(None) is None
    # Cost counts when asked: B is the same price, so the quality still decides.
    assert learned.choose(vec(NEW_MATH), cost_weight=0.5).arm == B


def test_too_few_rows_give_no_router_and_say_why(db_url, vec):
    log_scored(db_url, vec, topic_traffic(n=5))  # 20 rows
    learned = load(db_url)
    assert learned.router is None and not learned.ready
    assert learned.rows == 20 and learned.arms == ()
    assert "only 20 scored requests" in learned.reason and "need 50" in learned.reason
    assert learned.choose(vec(NEW_CODING)) is None

    assert load(db_url, min_rows=20).ready


def test_a_model_with_too_few_rows_is_no_arm(db_url, vec):
    log_scored(db_url, vec, topic_traffic() + [(p, "local-c", 1.0) for p in CODING[:5]])
    learned = load(db_url, models=[A, B, "local-c"])
    assert learned.arms == (A, B) and learned.rows == 80
    assert learned.rows_per_model["local-c"] == 5

    # One model with enough rows is no choice.
    learned = load(db_url, models=[A, "local-c"], min_rows=20)
    assert learned.router is None
    assert "fewer than two models have 10 scored requests" in learned.reason
    assert "local-a: 40" in learned.reason and "local-c: 5" in learned.reason


def test_rows_outside_the_window_are_ignored(db_url, vec):
    log_scored(db_url, vec, topic_traffic())
    # A week and more ago, the other way round, and three times as much of it.
    log_scored(db_url, vec, topic_traffic(0.1, 0.9, 0.95, 0.1) * 3, ts=NOW - timedelta(hours=200))
    # And rows from the future of `now` (a replay of an earlier hour) are not read either.
    log_scored(db_url, vec, topic_traffic(0.1, 0.9, 0.95, 0.1), ts=NOW + timedelta(hours=3))

    learned = load(db_url)
    assert learned.rows == 80
    assert (learned.choose(vec(NEW_CODING)).arm, learned.choose(vec(NEW_MATH)).arm) == (A, B)

    # A window that reaches them learns the old story.
    wide = load(db_url, window_h=300)
    assert wide.rows == 80 * 4
    assert (wide.choose(vec(NEW_CODING)).arm, wide.choose(vec(NEW_MATH)).arm) == (B, A)


def test_unconfigured_models_and_cache_hits_are_left_out(db_url, vec):
    log_scored(db_url, vec, topic_traffic())
    # A model no longer configured, excellent at everything.
    log_scored(db_url, vec, [(p, "retired", 0.99) for p in CODING + MATH])
    # Answers served from the cache, named after B: they say nothing about B.
    log_scored(db_url, vec, [(p, B, 1.0) for p in CODING] * 2, provider="cache")

    learned = load(db_url)
    assert learned.arms == (A, B) and learned.rows == 80
    assert "retired" not in learned.rows_per_model
    assert learned.choose(vec(NEW_CODING)).arm == A

    every = load(db_url, models=None)
    assert every.arms == (A, B, "retired")
    assert every.choose(vec(NEW_CODING)).arm == "retired"
    assert every.choose(vec(NEW_CODING), allowed=[A, B]).arm == A

    assert load(db_url, models=[]).reason == "no models to choose from"


def test_the_newest_rows_are_read_up_to_max_rows(db_url, vec):
    log_scored(db_url, vec, topic_traffic(), ts=NOW - timedelta(hours=1))
    log_scored(db_url, vec, topic_traffic(0.1, 0.9, 0.95, 0.1), ts=NOW - timedelta(hours=5))
    learned = load(db_url, max_rows=80)
    assert learned.rows == 80 and "the newest 80" in learned.reason
    assert learned.choose(vec(NEW_CODING)).arm == A


# ----------------------------------------------------------------------------------------------
# The gateway's state


def bump_rules(db_url: str) -> None:
    """What the loop's routing_rules asset does each hour (the trigger moves the version)."""
    with connect(db_url) as conn:
        conn.execute("INSERT INTO routing_rules (hour, rule_id, action, task_type, status, reason, evidence)"
                     " VALUES (date_trunc('hour', now()), %s, 'coach', 'coding', 'proposed', 'test', '{}')",
                     (f"coach:{uuid7()}",))


async def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_gateway_state_relearns_when_the_loop_writes_rules(db_url, vec):
    async def scenario() -> None:
        shared = SharedState(db_url, 0.05, learn_router=True, router_models=[A, B])
        shared.load()
        assert shared.learned is None  # loaded in the background after start, not in load()
        shared.start()
        try:
            await wait_for(lambda: shared.learned is not None)
            first = shared.learned
            assert first.router is None and "only 0 scored requests" in first.reason
            assert first.choose(vec(NEW_CODING)) is None

            # New scores alone do not reload it (a request never waits on a fit) ...
            log_scored(db_url, vec, topic_traffic(), ts=datetime.now(UTC) - timedelta(hours=1))
            await asyncio.sleep(0.5)
            assert shared.learned is first
            # ... the loop's next rules do, without a restart.
            bump_rules(db_url)
            await wait_for(lambda: shared.learned is not first)
            learned = shared.learned
            assert learned.ready and learned.arms == (A, B) and learned.rows == 80
            assert learned.choose(vec(NEW_CODING)).arm == A
            assert learned.choose(vec(NEW_MATH)).arm == B
        finally:
            await shared.stop()

    asyncio.run(scenario())


def test_a_failed_reload_keeps_the_router_held(db_url, vec, monkeypatch, caplog):
    log_scored(db_url, vec, topic_traffic(), ts=datetime.now(UTC) - timedelta(hours=1))
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("database went away")

    async def scenario() -> None:
        shared = SharedState(db_url, 0.05, learn_router=True, router_models=[A, B],
                             router_settings=RouterSettings(min_rows=10))
        shared.load()
        shared.start()
        try:
            await wait_for(lambda: shared.learned is not None)
            held = shared.learned
            assert held.ready
            monkeypatch.setattr(state_module, "load_with", broken)
            bump_rules(db_url)
            await wait_for(lambda: calls)
            await wait_for(lambda: shared._learn_task.done())
            assert shared.learned is held
            assert shared.rules.hour is not None  # the rules themselves were reloaded
            assert shared._learn_retry_at is not None
        finally:
            await shared.stop()

    with caplog.at_level(logging.WARNING, logger="tm_gateway.state"):
        asyncio.run(scenario())
    assert "learned router reload failed (RuntimeError: database went away)" in caplog.text


def test_the_learned_router_is_off_by_default(db_url, vec):
    log_scored(db_url, vec, topic_traffic())

    async def scenario() -> None:
        shared = SharedState(db_url, 0.05)
        shared.load()
        shared.start()
        try:
            bump_rules(db_url)
            await wait_for(lambda: shared.rules.hour is not None)
            await asyncio.sleep(0.2)
            assert shared.learned is None and shared._learn_task is None
        finally:
            await shared.stop()

    asyncio.run(scenario())


def test_auto_requests_go_where_the_log_says(db_url, vec, upstreams, tmp_path):
    """Through the real gateway: with routing.learned on, `auto` goes to the model the log predicts
    best for the prompt, once the loop has written rules (which is when the router is re-read)."""
    import openai
    import psycopg

    from tests.conftest import make_config, start_gateway
    from tm_gateway import keys
    from tm_resources.config import parse_config

    anth, local = upstreams
    data = make_config(anth.url, local.openai_url).model_dump(mode="json")
    for m in (A, B):
        data["models"][m] = {"provider": "local", "upstream": m, "tier": "local", "price": {"input": 0.1, "output": 0.2}}
    data["routing"] = {"learned": {"enabled": True, "min_rows": 20}}
    config = parse_config(data)
    log_scored(db_url, vec, topic_traffic())
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)

        def route(prompt: str):
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}])
            return raw.headers["x-tm-route"], raw.headers["x-tm-model"]

        deadline = time.monotonic() + 60
        while app.state.proxy.shared.learned is None or not app.state.proxy.shared.learned.ready:
            assert time.monotonic() < deadline, "the learned router was never loaded"
            time.sleep(0.2)
        assert route(NEW_CODING) == ("learned", A)
        assert route(NEW_MATH) == ("learned", B)
    finally:
        served.stop()
