"""Every kind of row the gateway writes goes through the whole loop: an hour of real gateway traffic
(answered, streamed, cached, cascaded, rejected, failed upstream, cut by either side) materializes
every asset, passes the blocking checks, and scores what can be scored."""

from __future__ import annotations

import time
from datetime import timedelta

import anthropic
import httpx
import openai
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tests.support import materialize, refuses_when_asked, write_config
from tests.traffic import past_hour
from tm_gateway import keys
from tm_resources.tables import COMPLETION_ENDPOINTS

MSG = [{"role": "user", "content": "Write a Python function that reverses a linked list in place."}]


@pytest.fixture
def gw(db_url, upstreams, tmp_path):
    anth, local = upstreams
    local.responder = refuses_when_asked
    config = make_config(anth.url, local.openai_url, cache={"enabled": True},
                         routing={"cascade": {"tiers": ["SIMPLE", "MEDIUM"]}})
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        yield served.url, key, app, anth, local
    finally:
        served.stop()


def send_every_kind_of_request(url: str, key: str, app, anth, local) -> None:
    oa = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    an = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
    auth = {"authorization": f"Bearer {key}"}

    oa.chat.completions.create(model="local-test", messages=MSG)                          # answered
    assert app.state.proxy.request_log.flush()  # logged: the same request again can be served from it
    oa.chat.completions.create(model="local-test", messages=MSG)                          # exact cache hit
    an.messages.create(model="claude-test", max_tokens=100, messages=[
        {"role": "user", "content": "What is the derivative of x^3 * sin(x)?"}])
    for _ in oa.chat.completions.create(model="local-test", stream=True, messages=[      # streamed
            {"role": "user", "content": "Explain what a mutex is, briefly."}]):
        pass
    with an.messages.stream(model="claude-test", max_tokens=100, messages=[
            {"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]) as s:
        for _ in s.text_stream:
            pass
    oa.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi there, how are you?"}])
    oa.chat.completions.create(model="auto", messages=[                                    # cascade escalated
        {"role": "user", "content": "please refuse this one"}])
    oa.chat.completions.create(model="local-test", messages=[                              # a NUL in the text
        {"role": "user", "content": "hi \u0000 there"}])

    # Rejected by the gateway: empty prompt, no model, and the like.
    for body in ({"model": "local-test", "messages": []}, {"model": "no-such-model", "messages": MSG},
                 {"messages": MSG}, {"model": "local-test", "messages": "hello"}):
        assert httpx.post(url + "/v1/chat/completions", headers=auth, json=body).status_code >= 400
    assert httpx.post(url + "/v1/messages", headers=auth,
                      json={"model": "claude-test", "messages": MSG}).status_code == 400  # no max_tokens
    assert httpx.post(url + "/v1/chat/completions", headers=auth, content=b"{not json").status_code == 400

    anth.fail(400, message="prompt is malformed upstream")                                 # provider error
    with pytest.raises(anthropic.APIStatusError):
        an.messages.create(model="claude-test", max_tokens=100, messages=MSG)
    local.fail(503, times=5)                                                               # provider down
    with pytest.raises(openai.APIStatusError):
        oa.chat.completions.create(model="local-test", messages=[{"role": "user", "content": "are you there?"}])

    local.reset()
    local.drop(after_chunks=2)                                                             # cut by the provider
    with pytest.raises(openai.APIError):
        for _ in oa.chat.completions.create(model="local-test", stream=True, messages=[
                {"role": "user", "content": "Tell me a long story about a dragon."}]):
            pass
    local.chunk_delay = 0.05                                                               # cut by the client
    local.responder = lambda fmt, body: " ".join(f"w{i}" for i in range(200))
    with httpx.stream("POST", url + "/v1/chat/completions", headers=auth,
                      json={"model": "local-test", "stream": True,
                            "messages": [{"role": "user", "content": "Count to two hundred."}]}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # Not model calls, but they may leave rows too.
    httpx.get(url + "/v1/models", headers=auth)
    httpx.post(url + "/v1/messages/count_tokens", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
               json={"model": "claude-test", "messages": MSG})


def test_an_hour_holding_every_kind_of_row_goes_through_the_whole_graph(gw, db_url, tmp_path):
    url, key, app, anth, local = gw
    send_every_kind_of_request(url, key, app, anth, local)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not query(db_url, "SELECT 1 FROM requests WHERE status = 499"):
        time.sleep(0.05)
    assert app.state.proxy.request_log.flush()
    # Move the hour's traffic into a past hour, as the automation would see it at five past.
    hour = past_hour(3)
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE requests SET ts = %s + (ts - (SELECT min(ts) FROM requests))",
                     (hour + timedelta(seconds=1),))
    rows = query(db_url, "SELECT * FROM requests")
    calls = [r for r in rows if r["endpoint"] in COMPLETION_ENDPOINTS]
    kinds = {(r["status"], r["cache_hit"], r["served"], r["stream"]) for r in calls}
    statuses = {r["status"] for r in calls}
    assert {200, 400, 404, 499, 502} <= statuses, kinds
    assert any(r["cache_hit"] for r in calls), kinds
    assert any(r["served"] is False for r in calls), kinds
    assert any(not r["prompt"] for r in calls) and any(r["model"] is None for r in calls)

    result = materialize(db_url, write_config(tmp_path), hour)
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())

    scored = {s["request_id"]: s for s in query(db_url, "SELECT * FROM scored_requests")}
    assert set(scored) == {r["id"] for r in calls}  # one row per model call, whatever became of it
    for r in calls:
        s = scored[r["id"]]
        if r["status"] == 200 and r["response_text"]:
            assert 0 <= s["quality"] <= 1, r
        else:
            assert s["quality"] is None, r  # nothing answered: nothing to score, never a made-up score
    typed = {t["request_id"] for t in query(db_url, "SELECT request_id FROM task_types")}
    assert typed == {r["id"] for r in calls if r["prompt"]}  # a rejected request has no prompt to type
    assert query(db_url, "SELECT count(*) AS n FROM grades")[0]["n"] == 1

    meta = result.asset_materializations_for_node("scored_requests")[0].metadata
    assert meta["quality_scored"].value == sum(1 for r in calls if r["status"] == 200 and r["response_text"])
    assert meta["not_scored"].value == {
        k: v for k, v in {
            "rejected (4xx)": sum(1 for r in calls if 400 <= r["status"] < 500 and r["status"] != 499),
            "failed upstream (5xx)": sum(1 for r in calls if r["status"] >= 500),
            "cut by the client (499)": sum(1 for r in calls if r["status"] == 499),
        }.items() if v}
    assert meta["not_model_calls"].value == len(rows) - len(calls)
    typed_meta = result.asset_materializations_for_node("task_types")[0].metadata
    assert typed_meta["not_typed_no_prompt"].value == sum(1 for r in calls if not r["prompt"])
