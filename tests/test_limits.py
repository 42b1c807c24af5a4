"""Rate limits through the official SDKs against real Postgres: requests per minute per key, tokens per
turn, turns per hour and turns in flight per agent; each a 429 in the caller's format with retry-after,
held across two gateways on one database, and free when nothing is configured. Loop detection: the same
tool call (name and arguments) answered three times within the window in one session is refused, in both
formats, before any provider is called; different arguments, other sessions, retries and time passing
are not loops."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import psycopg
import pytest

from tests.conftest import Gateway, make_config, start_gateway
from tm_gateway import keys

NO_LOOP = {"loop": {"repeats": 0}}


def serve(db_url: str, upstreams, home: Path, limits: dict, user: str = "alice") -> Gateway:
    anthropic_fake, local = upstreams
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, user)
    app, served = start_gateway(make_config(anthropic_fake.url, local.openai_url, limits=limits), db_url, home)
    return Gateway(url=served.url, key=key, user=user, db_url=db_url, app=app, served=served)


@pytest.fixture
def limited(request, db_url, upstreams, tmp_path):
    """A gateway with the limits the test's `limits` marker names."""
    gws: list[Gateway] = []

    def start(limits: dict, home: str = "a") -> Gateway:
        gw = serve(db_url, upstreams, tmp_path / home, limits)
        gws.append(gw)
        return gw

    yield start
    for gw in gws:
        gw.served.stop()


def oa(gw: Gateway, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, default_headers=headers)


def an(gw: Gateway, **headers) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, default_headers=headers)


def ask_openai(gw: Gateway, model: str = "local-test", max_tokens: int = 50, **headers):
    return oa(gw, **headers).chat.completions.create(
        model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "hello there"}])


def ask_anthropic(gw: Gateway, model: str = "claude-test", max_tokens: int = 50, **headers):
    return an(gw, **headers).messages.create(
        model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "hello there"}])


def clear_of_window_end(span_s: int, margin_s: float) -> None:
    """Wait, if need be, until the current fixed window has `margin_s` left: a test's requests must not
    straddle two windows (the second would let more through, as fixed windows do)."""
    left = span_s - time.time() % span_s
    if left < margin_s:
        time.sleep(left + 0.2)


def refused_rows(gw: Gateway) -> list[dict]:
    return gw.rows("error_class = 'rate_limited'")


def test_requests_per_minute_per_key_in_both_formats(limited, upstreams):
    clear_of_window_end(60, 20)
    gw = limited({"requests_per_minute": 3, **NO_LOOP})
    for _ in range(3):
        ask_openai(gw)
    with pytest.raises(openai.RateLimitError) as caught:
        ask_openai(gw)
    err = caught.value
    assert err.code == "rate_limit_exceeded"
    assert "3 requests a minute" in err.message and "limits.requests_per_minute" in err.message
    wait = int(err.response.headers["retry-after"])
    assert 1 <= wait <= 60
    with pytest.raises(anthropic.RateLimitError) as caught_a:
        ask_anthropic(gw)
    assert caught_a.value.body["error"]["type"] == "rate_limit_error"
    assert "3 requests a minute" in caught_a.value.body["error"]["message"]
    assert 1 <= int(caught_a.value.response.headers["retry-after"]) <= 60
    # Refused before any provider: the fakes saw only the three that passed.
    anthropic_fake, local = upstreams
    assert len(local.requests) == 3 and not anthropic_fake.requests
    rows = refused_rows(gw)
    assert [(r["status"], r["api_format"]) for r in rows] == [(429, "openai"), (429, "anthropic")]
    assert all("3 requests a minute" in r["error_message"] for r in rows)


def test_a_second_key_has_its_own_minute(limited, db_url):
    clear_of_window_end(60, 20)
    gw = limited({"requests_per_minute": 1, **NO_LOOP})
    ask_openai(gw)
    with psycopg.connect(db_url) as conn:
        other, _ = keys.create_key(conn, "bob")
    time.sleep(0.3)  # the gateway re-reads its keys
    bob = Gateway(url=gw.url, key=other, user="bob", db_url=db_url, app=gw.app, served=gw.served)
    ask_openai(bob)
    with pytest.raises(openai.RateLimitError):
        ask_openai(gw)


def test_tokens_per_turn_counts_input_and_max_tokens(limited):
    gw = limited({"tokens_per_turn": 500, **NO_LOOP})
    ask_openai(gw, max_tokens=400)
    with pytest.raises(openai.RateLimitError) as caught:
        ask_openai(gw, max_tokens=495)
    assert "limits.tokens_per_turn" in caught.value.message and "max_tokens 495" in caught.value.message
    assert caught.value.response.headers["retry-after"]
    with pytest.raises(anthropic.RateLimitError) as caught_a:
        an(gw).messages.create(model="claude-test", max_tokens=100,
                               messages=[{"role": "user", "content": "word " * 2000}])
    assert caught_a.value.body["error"]["type"] == "rate_limit_error"
    assert "over the 500" in caught_a.value.body["error"]["message"]
    assert len(refused_rows(gw)) == 2


def test_turns_per_hour_per_agent_with_overrides(limited):
    gw = limited({"turns_per_hour": 2, "agents": {"reviewer": {"turns_per_hour": 4}}, **NO_LOOP})
    for _ in range(2):
        ask_anthropic(gw, **{"x-tm-agent": "coder"})
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask_anthropic(gw, **{"x-tm-agent": "coder"})
    message = caught.value.body["error"]["message"]
    assert "agent 'coder' may take 2 turns an hour" in message
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 3600
    for _ in range(4):  # its own window, and its own limit
        ask_openai(gw, **{"x-tm-agent": "reviewer"})
    with pytest.raises(openai.RateLimitError) as caught_o:
        ask_openai(gw, **{"x-tm-agent": "reviewer"})
    assert "4 turns an hour" in caught_o.value.message


def test_a_refused_request_spends_nothing(limited):
    clear_of_window_end(60, 20)
    # Refused by the hourly limit, the request gives back the minute it took: the key still has it.
    gw = limited({"requests_per_minute": 2, "turns_per_hour": 1, **NO_LOOP})
    ask_openai(gw, **{"x-tm-agent": "a"})
    with pytest.raises(openai.RateLimitError):
        ask_openai(gw, **{"x-tm-agent": "a"})
    ask_openai(gw, **{"x-tm-agent": "b"})


def test_concurrent_turns_per_agent_freed_when_answers_end(limited, upstreams):
    anthropic_fake, local = upstreams
    gw = limited({"concurrent_turns": 2, **NO_LOOP})
    local.stall(1.5, times=2)
    agent = {"x-tm-agent": "builder"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(ask_openai, gw, **agent) for _ in range(2)]
        deadline = time.monotonic() + 5
        while len(local.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as caught:
            ask_openai(gw, **agent)
        assert "already has 2 turns in flight" in caught.value.message
        assert caught.value.response.headers["retry-after"] == "1"
        ask_openai(gw, **{"x-tm-agent": "someone-else"})
        for f in slow:
            f.result()
    ask_openai(gw, **agent)  # both ended: their places are free again


def test_a_cut_stream_frees_its_turn(limited, upstreams):
    anthropic_fake, local = upstreams
    local.chunk_delay = 0.2
    local.responder = lambda fmt, body: "word " * 50
    gw = limited({"concurrent_turns": 1, **NO_LOOP})
    body = {"model": "local-test", "stream": True, "max_tokens": 100,
            "messages": [{"role": "user", "content": "tell me a long story"}]}
    headers = {"authorization": f"Bearer {gw.key}", "x-tm-agent": "teller"}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            chunks = resp.iter_bytes()  # held: a dropped iterator closes the stream
            next(chunks)
            busy = client.post(gw.url + "/v1/chat/completions", json={**body, "stream": False}, headers=headers)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        # The client hung up mid-stream: its turn is given back.
        deadline = time.monotonic() + 5
        while True:
            again = client.post(gw.url + "/v1/chat/completions", json={**body, "stream": False}, headers=headers)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert again.status_code == 200
    assert [r["status"] for r in gw.rows("status = 499")] == [499]


def test_limits_hold_across_two_gateways_on_one_database(limited, upstreams):
    """Two gateways (each its own pool and event loop, like two worker processes) share one agent's hour:
    of 40 requests sent at once, split between them, exactly the limit pass."""
    first = limited({"turns_per_hour": 15, **NO_LOOP}, "one")
    second = limited({"turns_per_hour": 15, **NO_LOOP}, "two")
    outcomes: list[int] = []
    lock = threading.Lock()

    def one(gw: Gateway) -> None:
        try:
            ask_openai(gw, **{"x-tm-agent": "crawler"})
            status = 200
        except openai.RateLimitError:
            status = 429
        with lock:
            outcomes.append(status)

    clear_of_window_end(3600, 120)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(one, [first, second] * 20))
    assert outcomes.count(200) == 15 and outcomes.count(429) == 25, outcomes
    _, local = upstreams
    assert len(local.requests) == 15


def test_turns_in_flight_across_two_gateways(limited, upstreams):
    _, local = upstreams
    first = limited({"concurrent_turns": 3, **NO_LOOP}, "one")
    second = limited({"concurrent_turns": 3, **NO_LOOP}, "two")
    local.stall(1.0, times=10)
    agent = {"x-tm-agent": "swarm"}
    statuses: list[int] = []

    def one(gw: Gateway) -> None:
        try:
            ask_openai(gw, **agent)
            statuses.append(200)
        except openai.RateLimitError:
            statuses.append(429)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(one, [first, second] * 5))
    assert statuses.count(200) == 3 and statuses.count(429) == 7


def test_nothing_configured_costs_no_query(gateway, upstreams):
    # Loop detection is on by default, so a limits object exists, but a plain request takes no query.
    limits = gateway.app.state.proxy.limits
    assert limits is not None
    before = limits.pool.get_stats().get("requests_num", 0)
    ask_openai(gateway)
    ask_anthropic(gateway)
    assert limits.pool.get_stats().get("requests_num", 0) == before


def test_no_limits_and_no_loop_detection_opens_nothing(limited):
    gw = limited(NO_LOOP)
    assert gw.app.state.proxy.limits is None
    ask_openai(gw)


def test_an_agents_limits_beat_its_users_which_beat_the_defaults():
    from tm_gateway.stages.limits import effective

    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", limits={
        "requests_per_minute": 100, "turns_per_hour": 50,
        "users": {"intern": {"requests_per_minute": 10, "turns_per_hour": 5}},
        "agents": {"ci-bot": {"turns_per_hour": 500}}})
    assert effective(config, "alice", None).requests_per_minute == 100
    intern = effective(config, "intern", None)
    assert (intern.requests_per_minute, intern.turns_per_hour) == (10, 5)
    bot = effective(config, "intern", "ci-bot")
    assert (bot.requests_per_minute, bot.turns_per_hour, bot.concurrent_turns) == (10, 500, None)


# ---------------------------------------------------------------- loop detection

LOOP = {"loop": {"repeats": 3, "window_s": 60}}


def openai_turns(calls: list[tuple[str, dict]]) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "what is in this folder?"}]
    for i, (name, args) in enumerate(calls):
        cid = f"call_{i}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": cid, "content": "a.txt b.txt"})
    return messages


def anthropic_turns(calls: list[tuple[str, dict]]) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "what is in this folder?"}]
    for i, (name, args) in enumerate(calls):
        tid = f"toolu_{i}"
        messages.append({"role": "assistant", "content": [{"type": "tool_use", "id": tid, "name": name, "input": args}]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": "a.txt"}]})
    return messages


TOOLS_O = [{"type": "function", "function": {"name": "list_files", "parameters": {"type": "object"}}}]
TOOLS_A = [{"name": "list_files", "input_schema": {"type": "object"}}]


def send_openai(gw, calls, session="s-1"):
    return oa(gw, **{"x-tm-session": session}).chat.completions.create(
        model="local-test", max_tokens=20, messages=openai_turns(calls), tools=TOOLS_O)


def send_anthropic(gw, calls, metadata_session="5b6c0e4e-0d55-4c3e-9a77-8b1f7a1c2d3e"):
    return an(gw).messages.create(
        model="claude-test", max_tokens=20, messages=anthropic_turns(calls), tools=TOOLS_A,
        metadata={"user_id": json.dumps({"device_id": "d", "session_id": metadata_session})})


def test_the_third_same_call_is_refused_openai(limited, upstreams):
    gw = limited(LOOP)
    _, local = upstreams
    same = ("list_files", {"path": ".", "all": True})
    send_openai(gw, [same])
    send_openai(gw, [same, same])
    # The same request again (a client retry) is not a new call.
    send_openai(gw, [same, same])
    with pytest.raises(openai.BadRequestError) as caught:
        # Arguments spelt in another key order are the same call.
        send_openai(gw, [same, same, ("list_files", {"all": True, "path": "."})])
    err = caught.value
    assert err.code == "loop_detected"
    assert "'list_files'" in err.message and "3 times" in err.message
    assert len(local.requests) == 3  # the refused one reached no model
    rows = gw.rows("error_class = 'loop_detected'")
    assert len(rows) == 1 and rows[0]["status"] == 400 and "list_files" in rows[0]["error_message"]
    # Another session doing the same is its own conversation.
    send_openai(gw, [same, same], session="s-2")


def test_the_third_same_call_is_refused_anthropic(limited, upstreams):
    gw = limited(LOOP)
    anthropic_fake, _ = upstreams
    same = ("read_file", {"path": "README.md"})
    send_anthropic(gw, [same])
    send_anthropic(gw, [same, same])
    with pytest.raises(anthropic.BadRequestError) as caught:
        send_anthropic(gw, [same, same, same])
    body = caught.value.body["error"]
    assert body["type"] == "invalid_request_error"
    assert "'read_file'" in body["message"] and "loop detected" in body["message"]
    assert len(anthropic_fake.requests) == 2
    [row] = gw.rows("error_class = 'loop_detected'")
    assert row["api_format"] == "anthropic"


def test_different_arguments_are_no_loop(limited):
    gw = limited(LOOP)
    calls = [("list_files", {"path": p}) for p in ("a", "b", "c", "d")]
    for n in range(1, 5):
        send_openai(gw, calls[:n])
        send_anthropic(gw, calls[:n])
    assert not gw.rows("error_class = 'loop_detected'")


def test_calls_spread_beyond_the_window_are_no_loop(limited):
    gw = limited({"loop": {"repeats": 3, "window_s": 1}})
    same = ("list_files", {"path": "."})
    for n in range(1, 5):
        send_anthropic(gw, [same] * n)
        time.sleep(0.6)  # two calls at most within any second
    assert not gw.rows("error_class = 'loop_detected'")
    # Quickly, the same calls are a loop.
    send_anthropic(gw, [same] * 5, metadata_session="other")  # records call 4 of this session
    send_anthropic(gw, [same] * 6, metadata_session="other")
    with pytest.raises(anthropic.BadRequestError):
        send_anthropic(gw, [same] * 7, metadata_session="other")


def test_thresholds_are_configurable(limited):
    gw = limited({"loop": {"repeats": 2, "window_s": 60}})
    same = ("grep", {"pattern": "TODO"})
    send_openai(gw, [same])
    with pytest.raises(openai.BadRequestError) as caught:
        send_openai(gw, [same, same])
    assert "2 times" in caught.value.message
