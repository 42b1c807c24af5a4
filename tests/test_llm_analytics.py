"""PostHog's LLM analytics: each request reaches the loopback capture server as `$ai_generation` (sent by the
real SDK from the log writer's thread) with the properties PostHog documents, matching its row; no prompt or
answer text unless `posthog.capture_content` is on, and then redacted; cache hits and grades as events too."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import anthropic
import openai
import pandas as pd
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tests.fakes import FakePostHog
from tm_assets.grade_events import send_grade_events
from tm_gateway import keys
from tm_resources.events import EventSink

PROMPT = "Summarise the quarterly figures for the board"
SECRET = "sk-ant-api03-" + "Q" * 40


@pytest.fixture
def posthog(monkeypatch):
    with FakePostHog() as ph:
        monkeypatch.setenv("POSTHOG_API_KEY", "phc_test_project")
        monkeypatch.setenv("POSTHOG_HOST", ph.url)
        yield ph


def _gateway(db_url, upstreams, tmp_path, **posthog_settings):
    anth, local = upstreams
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    config = make_config(anth.url, local.openai_url, gateway={"classify_auto": False, "refresh_interval_s": 0.1},
                         cache={"enabled": True, "semantic": {"enabled": False}}, posthog=posthog_settings)
    app, served = start_gateway(config, db_url, tmp_path)
    return app, served, key


def generations(ph: FakePostHog, n: int) -> list[dict]:
    events = ph.wait_for(n, timeout=10)
    return [e for e in events if e["event"] == "$ai_generation"]


def test_each_request_is_an_ai_generation_matching_its_row_without_its_text(db_url, upstreams, tmp_path, posthog):
    app, served, key = _gateway(db_url, upstreams, tmp_path)
    try:
        oa = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        an = anthropic.Anthropic(base_url=served.url, api_key=key, max_retries=0)
        oa.chat.completions.create(model="local-test", messages=[{"role": "user", "content": PROMPT}],
                                   extra_headers={"x-tm-session": "sess-42", "x-tm-agent": "planner"})
        with an.messages.stream(model="claude-test", max_tokens=50,
                                messages=[{"role": "user", "content": "Stream a haiku about ledgers"}]) as s:
            s.until_done()
        with pytest.raises(openai.NotFoundError):
            oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": PROMPT}])
        assert app.state.proxy.request_log.flush()
        cached = oa.chat.completions.with_raw_response.create(
            model="local-test", messages=[{"role": "user", "content": PROMPT}],
            extra_headers={"x-tm-session": "sess-42", "x-tm-agent": "planner"})
        assert cached.headers["x-tm-cache"] == "exact"
        assert app.state.proxy.request_log.flush()
        rows = {str(r["id"]): r for r in query(db_url, "SELECT * FROM requests")}
        events = posthog.wait_for(5, timeout=10)  # four generations and one cache hit
    finally:
        served.stop()

    gens = {e["properties"]["$ai_span_id"]: e for e in events if e["event"] == "$ai_generation"}
    assert set(gens) == set(rows)
    for rid, e in gens.items():
        row, p = rows[rid], e["properties"]
        assert e["distinct_id"] == "alice" and e["uuid"] == rid and e["api_key"] == "phc_test_project"
        assert p["$ai_http_status"] == row["status"]
        assert p["$ai_is_error"] is (row["status"] >= 400)
        assert p["$ai_input_tokens"] == row["input_tokens"] and p["$ai_output_tokens"] == row["output_tokens"]
        assert p["$ai_latency"] == pytest.approx(row["latency_ms"] / 1000, abs=1e-5)
        assert p["$ai_total_cost_usd"] == pytest.approx(row["cost_usd"])
        assert p["$ai_trace_id"] == (row["session_id"] or rid)
        assert "$ai_input" not in p and "$ai_output_choices" not in p

    answered = next(e["properties"] for e in gens.values()
                    if e["properties"]["tm_agent"] == "planner" and not e["properties"]["tm_cache_hit"])
    assert answered["$ai_model"] == "local-test" and answered["$ai_provider"] == "local"
    assert answered["$ai_trace_id"] == "sess-42" and answered["$ai_session_id"] == "sess-42"
    assert answered["$ai_input_tokens"] > 0 and answered["$ai_output_tokens"] > 0
    # local-test costs $0.1 / $0.2 per million input / output tokens (tests/conftest.py)
    assert answered["$ai_input_cost_usd"] == pytest.approx(answered["$ai_input_tokens"] * 0.1 / 1e6)
    assert answered["$ai_output_cost_usd"] == pytest.approx(answered["$ai_output_tokens"] * 0.2 / 1e6)
    assert answered["$ai_base_url"].startswith("http://127.0.0.1:")
    assert answered["$ai_is_error"] is False and answered["$ai_stream"] is False

    streamed = next(e["properties"] for e in gens.values() if e["properties"]["$ai_stream"])
    assert streamed["$ai_model"] == "claude-test" and streamed["$ai_provider"] == "anthropic"
    assert 0 < streamed["$ai_time_to_first_token"] <= streamed["$ai_latency"]

    refused = next(e["properties"] for e in gens.values() if e["properties"]["$ai_http_status"] == 404)
    assert refused["$ai_is_error"] is True and "no-such-model" in refused["$ai_error"]

    hit = next(e["properties"] for e in gens.values() if e["properties"]["tm_cache_hit"] == "exact")
    assert hit["$ai_provider"] == "cache" and hit["$ai_total_cost_usd"] == 0
    [cache_event] = [e for e in events if e["event"] == "tm_cache_hit"]
    assert cache_event["properties"]["kind"] == "exact" and cache_event["distinct_id"] == "alice"
    assert cache_event["properties"]["request_id"] == hit["$ai_span_id"]
    assert cache_event["properties"]["source_request_id"] == answered["$ai_span_id"]

    # Nothing anyone typed or read left for PostHog.
    sent = json.dumps(posthog.events)
    assert PROMPT not in sent and "haiku" not in sent and "echo:" not in sent


def test_capture_content_sends_prompt_and_answer_redacted(db_url, upstreams, tmp_path, posthog):
    app, served, key = _gateway(db_url, upstreams, tmp_path, capture_content=True)
    try:
        oa = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        oa.chat.completions.create(model="local-test", messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"{PROMPT}; my key is {SECRET}"}])
        assert app.state.proxy.request_log.flush()
        [gen] = generations(posthog, 1)
    finally:
        served.stop()
    p = gen["properties"]
    assert p["$ai_input"][0] == {"role": "system", "content": "You are terse."}
    assert p["$ai_input"][-1]["role"] == "user" and PROMPT in p["$ai_input"][-1]["content"]
    assert p["$ai_output_choices"][0]["role"] == "assistant" and PROMPT in p["$ai_output_choices"][0]["content"]
    assert SECRET not in json.dumps(posthog.events) and "[SECRET]" in p["$ai_input"][-1]["content"]


def test_llm_analytics_can_be_turned_off(db_url, upstreams, tmp_path, posthog):
    app, served, key = _gateway(db_url, upstreams, tmp_path, llm_analytics=False)
    try:
        oa = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        oa.chat.completions.create(model="local-test", messages=[{"role": "user", "content": PROMPT}])
        assert app.state.proxy.request_log.flush()
    finally:
        served.stop()  # closing flushes the SDK's queue
    assert [e["event"] for e in posthog.events] == []


def test_trace_ids_keep_to_the_characters_posthog_accepts():
    from tm_gateway.analytics import trace_id

    assert trace_id("d9222e05-8708-41b8-98ea-d4a21849e761") == "d9222e05-8708-41b8-98ea-d4a21849e761"
    assert trace_id("team/alpha session #3") == "team_alpha_session__3"


def test_grades_are_sent_once_per_user_and_hour_without_prompt_text(posthog):
    hour = datetime(2026, 11, 30, 9, tzinfo=UTC)
    table = pd.DataFrame([
        {"user_id": "alice", "grade": "B", "avg_quality_score": 0.74, "samples": 12, "requests_today": 30,
         "tokens_today": 5400, "cost_today": 0.12, "escalations": 1, "wrong_model_rate": 0.1,
         "prompt_quality_avg": 0.6, "low_prompt_days": 0, "coaching_example": PROMPT},
        {"user_id": "bob", "grade": None, "avg_quality_score": float("nan"), "samples": 0, "requests_today": 2,
         "tokens_today": 100, "cost_today": 0.0, "escalations": 0, "wrong_model_rate": None,
         "prompt_quality_avg": None, "low_prompt_days": 0, "coaching_example": None},
    ])
    sink = EventSink("phc_test_project", posthog.url, sync=True)
    assert send_grade_events(sink, table, hour) == 2
    assert send_grade_events(sink, table, hour) == 2  # a re-run hour: the same event ids
    sink.close()
    events = posthog.wait_for(4)
    assert {e["event"] for e in events} == {"tm_grade"}
    alice = [e for e in events if e["distinct_id"] == "alice"]
    assert len({e["uuid"] for e in alice}) == 1
    assert alice[0]["properties"]["grade"] == "B" and alice[0]["properties"]["avg_quality_score"] == 0.74
    bob = next(e for e in events if e["distinct_id"] == "bob")
    assert bob["properties"]["avg_quality_score"] is None and bob["properties"]["grade"] is None
    assert PROMPT not in json.dumps(events)
