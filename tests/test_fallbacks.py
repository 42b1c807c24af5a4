"""Fallbacks, failure by failure, against fake providers that really fail: key rotation on 429 and 401,
the next model on 503 and refused connections, a larger context window when the prompt is too long,
one retry on a timeout, cool-downs, and never falling "up" from an included model to a premium one."""

from __future__ import annotations

import json

import openai
import psycopg
import pytest

from tests.conftest import query, start_gateway
from tests.fakes import FakeUpstream
from tm_gateway import keys
from tm_resources.config import parse_config

KEY_1, KEY_2 = "sk-ant-first-key-000001", "sk-ant-second-key-000002"


@pytest.fixture
def setup(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TM_FB_KEY_1", KEY_1)
    monkeypatch.setenv("TM_FB_KEY_2", KEY_2)
    with FakeUpstream(api_keys={KEY_1, KEY_2}) as anth, FakeUpstream() as small, FakeUpstream() as big:
        small.max_context = 20  # the small local server refuses long prompts, as a real one would
        config = parse_config({
            "gateway": {"cooldown_s": 30, "max_retry_wait_s": 0.2},
            "log": {"flush_interval_ms": 20},
            "cache": {"enabled": False},  # every test here repeats its request on purpose
            "providers": {
                "anthropic": {"kind": "anthropic", "base_url": anth.url, "api_key_env": ["TM_FB_KEY_1", "TM_FB_KEY_2"],
                              "timeout_s": 0.5},
                "small": {"kind": "openai", "base_url": small.openai_url},
                "big": {"kind": "openai", "base_url": big.openai_url},
            },
            "models": {
                "claude": {"provider": "anthropic", "upstream": "claude-up", "tier": "included",
                           "context_window": 200000, "fallbacks": ["claude-premium", "local-big"]},
                "claude-premium": {"provider": "anthropic", "upstream": "premium-up", "tier": "premium",
                                   "context_window": 200000},
                "local-small": {"provider": "small", "upstream": "small-up", "tier": "local",
                                "context_window": 20, "fallbacks": ["local-other"]},
                "local-other": {"provider": "small", "upstream": "other-up", "tier": "local", "context_window": 20},
                "local-big": {"provider": "big", "upstream": "big-up", "tier": "local", "context_window": 100000},
            },
            "defaults": {"model": "local-small", "frontier_model": "claude"},
        })
        with psycopg.connect(db_url) as conn:
            key, _ = keys.create_key(conn, "fran")
        app, served = start_gateway(config, db_url, tmp_path)
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        try:
            yield client, app, db_url, anth, small, big
        finally:
            served.stop()


def ask(client, model: str, text: str = "hello there"):
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])


def rows(app, db_url):
    assert app.state.proxy.request_log.flush()
    return query(db_url, "SELECT model, status, attempts FROM requests ORDER BY ts")


def test_429_rotates_to_the_next_key(setup):
    client, app, db_url, anth, *_ = setup
    anth.fail(429, times=1)
    raw = ask(client, "claude")
    assert raw.headers["x-tm-model"] == "claude"
    assert [r.headers["x-api-key"] for r in anth.requests] == [KEY_1, KEY_2]
    [row] = rows(app, db_url)
    assert [(a["key"], a["status"]) for a in row["attempts"]] == [(0, 429), (1, 200)]


def test_429_on_every_key_waits_once_then_takes_the_next_model(setup):
    client, app, db_url, anth, small, big = setup
    anth.fail(429, times=3, model="claude-up", retry_after=0.1)
    raw = ask(client, "claude")
    # Never up to premium: the chain goes claude -> (premium skipped) -> local-big.
    assert raw.headers["x-tm-model"] == "local-big"
    assert all(r.body["model"] != "premium-up" for r in anth.requests)
    [row] = rows(app, db_url)
    assert [(a["model"], a["status"]) for a in row["attempts"]] == [
        ("claude", 429), ("claude", 429), ("claude", 429), ("local-big", 200)]
    assert row["model"] == "local-big" and row["status"] == 200


def test_503_moves_on_at_once_and_the_failed_model_cools_down(setup):
    client, app, db_url, anth, small, big = setup
    small.fail(503, times=1, model="small-up")
    assert ask(client, "local-small").headers["x-tm-model"] == "local-other"
    before = len(small.requests)
    assert ask(client, "local-small").headers["x-tm-model"] == "local-other"
    # The second request did not spend an attempt on the model that just failed.
    assert [r.body["model"] for r in small.requests[before:]] == ["other-up"]
    first, second = rows(app, db_url)
    assert [a["status"] for a in first["attempts"]] == [503, 200]
    assert second["attempts"][0] == {"model": "local-small", "outcome": "skipped: cooling down"}


def test_a_prompt_too_long_goes_to_a_model_with_a_larger_context(setup):
    client, app, db_url, anth, small, big = setup
    long_prompt = " ".join(["word"] * 200)
    raw = ask(client, "local-small", long_prompt)
    assert raw.headers["x-tm-model"] == "local-big"
    [row] = rows(app, db_url)
    assert row["attempts"][0]["failure"] == "context_too_long"
    assert row["attempts"][-1]["model"] == "local-big"


def test_a_timeout_is_retried_once_then_the_next_model(setup):
    client, app, db_url, anth, small, big = setup
    anth.stall(2.0, times=1, model="claude-up")
    assert ask(client, "claude").headers["x-tm-model"] == "claude"  # the retry got through
    anth.stall(2.0, times=2, model="claude-up")
    assert ask(client, "claude").headers["x-tm-model"] == "local-big"
    first, second = rows(app, db_url)
    assert [a["status"] for a in first["attempts"]] == [504, 200]
    assert [a["status"] for a in second["attempts"]] == [504, 504, 200]


def test_an_auth_failure_on_every_key_is_reported_not_fallen_back_from(setup):
    client, app, db_url, anth, *_ = setup
    anth.fail(401, times=2, message="invalid x-api-key")
    with pytest.raises(openai.AuthenticationError) as e:
        ask(client, "claude")
    assert e.value.status_code == 401
    [row] = rows(app, db_url)
    assert [(a["key"], a["status"]) for a in row["attempts"]] == [(0, 401), (1, 401)]
    assert row["status"] == 401


def test_a_client_error_is_not_retried(setup):
    client, app, db_url, anth, small, big = setup
    small.fail(400, times=1, message="bad parameter")
    with pytest.raises(openai.BadRequestError):
        ask(client, "local-small")
    [row] = rows(app, db_url)
    assert len(row["attempts"]) == 1 and json.dumps(row["attempts"]).count("local-other") == 0
