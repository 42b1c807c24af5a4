"""Bad input from either side never becomes a 500: a client's bad body gets a 4xx in its own format before
any provider is called; a provider's unreadable answer (wrong shape, HTML, broken JSON, a malformed event)
is that provider's failure: the next model is tried, else a 502 in the caller's format, and the row says so.
Unknown paths and methods answer in the caller's format too, and failed logins are logged and slowed."""

from __future__ import annotations

import logging
import time

import anthropic
import httpx
import openai
import psycopg
import pytest

from tests.conftest import CLAUDE_PRICE, LOCAL_PRICE, Gateway, make_config, start_gateway
from tm_gateway import keys
from tm_gateway.logins import LoginGuard
from tm_gateway.schemas import MAX_DEPTH, too_deep

MSG = [{"role": "user", "content": "hello there"}]


def oa(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)


def an(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# ---------------------------------------------------------------- the client's bad input


def test_the_depth_limit_is_exact_whatever_the_containers():
    # too_deep leans on orjson's own recursion limit: this fails if a new orjson moves it.
    assert not too_deep(nested(MAX_DEPTH)) and too_deep(nested(MAX_DEPTH + 1))
    assert not too_deep({"a": [{"b": nested(MAX_DEPTH - 3)}]}) and too_deep({"a": [{"b": nested(MAX_DEPTH - 2)}]})
    assert not too_deep({"model": "m", "messages": [{"role": "user", "content": "hi"}]})



@pytest.mark.parametrize("stream", [False, True])
def test_stream_options_that_is_not_an_object_is_a_400_before_any_provider_call(gateway: Gateway, upstreams,
                                                                                  stream):
    anth, local = upstreams
    with pytest.raises(openai.BadRequestError) as e:
        oa(gateway).chat.completions.create(model="claude-test", messages=MSG, stream=stream,
                                            stream_options=[1])  # type: ignore[arg-type]
    assert "stream_options" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e2:
        an(gateway).messages.create(model="local-test", max_tokens=10, messages=MSG, stream=stream,
                                    extra_body={"stream_options": [1]})
    assert e2.value.body["error"]["type"] == "invalid_request_error"
    assert "stream_options" in e2.value.body["error"]["message"]
    assert anth.requests == [] and local.requests == []
    rows = gateway.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [(400, "invalid_request")] * 2


def test_a_body_nested_too_deep_is_a_400_and_a_deep_but_sane_one_is_answered(gateway: Gateway, upstreams):
    _, local = upstreams
    with pytest.raises(openai.BadRequestError) as e:
        oa(gateway).chat.completions.create(model="local-test", messages=MSG, extra_body={"x": nested(256)})
    assert "nests deeper than" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e2:
        an(gateway).messages.create(model="local-test", max_tokens=10, messages=MSG,
                                    metadata={"user_id": "u"}, extra_body={"x": nested(600)})
    assert "nests deeper than" in e2.value.body["error"]["message"]
    assert local.requests == []
    got = oa(gateway).chat.completions.create(model="local-test", messages=MSG, extra_body={"x": nested(150)})
    assert got.choices[0].message.content == "echo: hello there"
    assert [r["status"] for r in gateway.rows()] == [400, 400, 200]


@pytest.mark.parametrize("content,needle", [
    ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
    ([{"type": "image_url", "image_url": "not-an-object"}], "messages[0].content[0].image_url"),
    ([7], "messages[0].content[0]"),
])
def test_an_openai_content_part_of_the_wrong_type_never_reaches_the_provider(gateway: Gateway, upstreams,
                                                                              content, needle):
    _, local = upstreams  # same format: the body would otherwise pass through untouched
    with pytest.raises(openai.BadRequestError) as e:
        oa(gateway).chat.completions.create(model="local-test", messages=[{"role": "user", "content": content}])
    message = e.value.body["message"]
    assert message.startswith(needle)
    assert local.requests == []
    [row] = gateway.rows()
    assert (row["status"], row["error_class"], row["error_message"]) == (400, "invalid_request", message)


def test_anthropic_blocks_are_checked_whole_and_cache_control_passes_untouched(gateway: Gateway, upstreams):
    anth, _ = upstreams
    with pytest.raises(anthropic.BadRequestError) as e:
        an(gateway).messages.create(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": 3}]}]}])
    assert e.value.body["error"]["message"].startswith("messages[0].content[0].content[0].text")
    with pytest.raises(anthropic.BadRequestError):
        an(gateway).messages.create(model="claude-test", max_tokens=10, messages=MSG,
                                    metadata=["not", "an", "object"])  # type: ignore[arg-type]
    assert anth.requests == []
    block = {"type": "text", "text": "hello there", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    an(gateway).messages.create(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": [block]}])
    assert anth.requests[-1].body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


# ---------------------------------------------------------------- the provider's unreadable answers


@pytest.fixture
def fallback_gateway(db_url, upstreams, tmp_path):
    """local-test falls back to claude-test; claude-test has nothing behind it."""
    anth, local = upstreams
    config = make_config(anth.url, local.openai_url, models={
        "claude-test": {"provider": "anthropic", "upstream": "claude-upstream", "tier": "included",
                        "context_window": 200000, "price": CLAUDE_PRICE},
        "local-test": {"provider": "local", "upstream": "tiny-local", "tier": "local", "context_window": 8192,
                       "price": LOCAL_PRICE, "fallbacks": ["claude-test"]},
    })
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "erin")
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        yield Gateway(url=served.url, key=key, user="erin", db_url=db_url, app=app, served=served)
    finally:
        served.stop()


GARBLED = [
    pytest.param(b'{"choices": "notalist"}', "application/json", id="wrong-shape"),
    pytest.param(b"<html><body>502 Bad Gateway</body></html>", "text/html", id="html"),
    pytest.param(b'{"choices": [', "application/json", id="broken-json"),
]


@pytest.mark.parametrize("raw,ctype", GARBLED)
@pytest.mark.parametrize("stream", [False, True])
def test_an_unreadable_answer_takes_the_next_model(fallback_gateway: Gateway, upstreams, raw, ctype, stream):
    anth, local = upstreams
    local.garble(raw, content_type=ctype)
    client = oa(fallback_gateway)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="local-test", messages=MSG, stream=True) if c.choices)
    else:
        text = client.chat.completions.create(model="local-test", messages=MSG).choices[0].message.content
    assert text == "echo: hello there"
    [row] = fallback_gateway.rows()
    assert (row["status"], row["model"]) == (200, "claude-test")
    first, second = row["attempts"]
    assert first["model"] == "local-test" and first["failure"] == "unavailable"
    assert second["model"] == "claude-test" and "failure" not in second


def test_a_whole_answer_cut_halfway_takes_the_next_model(fallback_gateway: Gateway, upstreams):
    anth, local = upstreams
    local.cut_body()
    reply = an(fallback_gateway).messages.create(model="local-test", max_tokens=50, messages=MSG)
    assert reply.content[0].text == "echo: hello there"
    [row] = fallback_gateway.rows()
    assert (row["status"], row["model"]) == (200, "claude-test")
    assert row["attempts"][0]["model"] == "local-test" and row["attempts"][0]["failure"] == "unavailable"


@pytest.mark.parametrize("raw,ctype", GARBLED)
def test_an_unreadable_answer_with_nothing_behind_it_is_a_502_in_the_callers_format(fallback_gateway: Gateway,
                                                                                     upstreams, raw, ctype):
    anth, _ = upstreams
    anth.garble(raw.replace(b"choices", b"content"), content_type=ctype)
    with pytest.raises(anthropic.APIStatusError) as e:
        an(fallback_gateway).messages.create(model="claude-test", max_tokens=10, messages=MSG)
    assert e.value.status_code == 502 and e.value.body["type"] == "error"
    assert "provider 'anthropic'" in e.value.body["error"]["message"]
    anth.garble(raw.replace(b"choices", b"content"), content_type=ctype)
    with pytest.raises(openai.APIStatusError) as e2:  # the OpenAI caller, across formats
        oa(fallback_gateway).chat.completions.create(model="claude-test", messages=MSG)
    assert e2.value.status_code == 502 and "provider 'anthropic'" in e2.value.message
    rows = fallback_gateway.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [(502, "upstream_bad_response")] * 2


@pytest.mark.parametrize("line", [b"data: {this is not json", b'data: {"choices": [{"delta": {"content": 5}}]}',
                                  b"data: 42"])
def test_a_malformed_event_mid_stream_is_an_error_event_and_a_502_row(gateway: Gateway, upstreams, line):
    anth, local = upstreams
    local.bad_event(line, after_chunks=2)  # OpenAI caller, OpenAI-kind provider: events pass through
    seen = []
    with pytest.raises(openai.APIError) as e:
        for chunk in oa(gateway).chat.completions.create(model="local-test", messages=MSG, stream=True):
            seen.extend(c.delta.content or "" for c in chunk.choices)
    assert "malformed event" in e.value.message and "".join(seen).startswith("echo:")
    local.bad_event(line, after_chunks=2)  # Anthropic caller, translated
    with pytest.raises(anthropic.APIError) as e2:
        with an(gateway).messages.stream(model="local-test", max_tokens=50, messages=MSG) as s:
            for _ in s.text_stream:
                pass
    assert "malformed event" in str(e2.value)
    anth.bad_event(line.replace(b"choices", b"delta"), after_chunks=1)  # Anthropic-kind provider
    with pytest.raises(anthropic.APIError):
        with an(gateway).messages.stream(model="claude-test", max_tokens=50, messages=MSG) as s:
            for _ in s.text_stream:
                pass
    rows = gateway.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [(502, "upstream_bad_response")] * 3
    assert all(r["stream"] and "malformed event" in r["error_message"] for r in rows)


# ---------------------------------------------------------------- unknown paths and methods


def test_unknown_paths_and_methods_answer_in_the_callers_format(gateway: Gateway):
    with pytest.raises(openai.NotFoundError) as e:
        oa(gateway).embeddings.create(model="local-test", input="hi")
    assert "no such endpoint: POST /v1/embeddings" in e.value.message
    with pytest.raises(anthropic.NotFoundError) as e2:
        an(gateway).messages.batches.list()
    assert e2.value.body["type"] == "error" and e2.value.body["error"]["type"] == "not_found_error"
    r = httpx.get(gateway.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"] == "method not allowed: GET /v1/chat/completions; allowed: POST"
    r = httpx.get(gateway.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.get(gateway.url + "/nowhere", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error" and r.json()["type"] == "error"
    # The requests that carried a valid key (the SDKs') left their rows; the bare ones had no key.
    rows = gateway.rows()
    assert [(r["endpoint"], r["status"], r["error_class"], r["api_format"]) for r in rows] == [
        ("/v1/embeddings", 404, "unknown_endpoint", "openai"),
        ("/v1/messages/batches", 404, "unknown_endpoint", "anthropic")]


# ---------------------------------------------------------------- failed logins


def test_failed_logins_are_logged_without_the_key_and_a_source_that_keeps_failing_is_slowed(
        db_url, upstreams, tmp_path, caplog):
    anth, local = upstreams
    config = make_config(anth.url, local.openai_url, gateway={"login_free_failures": 2, "login_backoff_max_s": 30})
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "gus")
    app, served = start_gateway(config, db_url, tmp_path)
    wrong = "tm-guess-0123456789abcdefghij"
    try:
        caplog.set_level(logging.WARNING, logger="tm_gateway.logins")
        guesser = openai.OpenAI(base_url=served.url + "/v1", api_key=wrong, max_retries=0)
        for _ in range(2):
            with pytest.raises(openai.AuthenticationError):
                guesser.chat.completions.create(model="local-test", messages=MSG)
        with pytest.raises(openai.RateLimitError) as e:
            guesser.chat.completions.create(model="local-test", messages=MSG)
        assert e.value.response.headers["retry-after"] == "1"
        # While it backs off, no key from that address is looked at; a real user's refusal is logged.
        with pytest.raises(anthropic.RateLimitError) as e2:
            anthropic.Anthropic(base_url=served.url, api_key=key, max_retries=0).messages.create(
                model="local-test", max_tokens=10, messages=MSG)
        assert "failed logins" in e2.value.body["error"]["message"]
        time.sleep(float(e.value.response.headers["retry-after"]) + 0.1)
        ok = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        assert ok.chat.completions.create(model="local-test", messages=MSG).choices[0].message.content
        with pytest.raises(openai.RateLimitError) as e3:  # the next failure doubles the wait
            guesser.chat.completions.create(model="local-test", messages=MSG)
        assert e3.value.response.headers["retry-after"] == "2"
        assert app.state.proxy.request_log.flush()
        with psycopg.connect(db_url) as conn:
            rows = conn.execute("SELECT status, error_class, user_id FROM requests ORDER BY ts").fetchall()
        assert rows == [(429, "login_backoff", "gus"), (200, None, "gus")]
    finally:
        served.stop()
    logged = [r.getMessage() for r in caplog.records if r.name == "tm_gateway.logins"]
    assert len(logged) == 4 and all("failed login from 127.0.0.1" in m for m in logged)
    assert not any(wrong in m or wrong[3:15] in m for m in logged)


def test_the_failed_login_table_stays_bounded_and_forgets_quiet_addresses():
    guard = LoginGuard(free=1, max_backoff_s=8, forget_after_s=0.05, max_sources=100)
    for i in range(1000):  # a flood from many addresses keeps only the most recent ones
        guard.failed(f"10.0.{i // 256}.{i % 256}", "tm-x", "/v1/messages")
    assert len(guard._sources) == 100
    assert guard.failed("10.9.9.9", None, "/") == 0 and guard.failed("10.9.9.9", None, "/") == 1
    assert [guard.failed("10.9.9.9", None, "/") for _ in range(4)] == [2, 4, 8, 8]
    time.sleep(0.1)
    assert guard.failed("10.9.9.9", None, "/") == 0  # quiet long enough: it starts again


def test_a_client_gone_before_its_body_arrived_leaves_a_499_row_and_no_traceback(gateway: Gateway, caplog):
    # A client that sends its headers and part of the body, then closes (a killed process, a timeout
    # on its side): nobody is there to answer, but the request reached the gateway with a valid key.
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(gateway.url)
    body = b'{"model": "local-test", "messages": [{"role": "user", "content": "hel'
    with caplog.at_level(logging.ERROR), socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {gateway.key}\r\nContent-Length: {len(body) + 500}\r\n\r\n".encode()
                  + body)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while not (rows := gateway.rows("endpoint = '/v1/chat/completions'")):
        assert time.monotonic() < deadline, "the request left no row"
        time.sleep(0.05)
    assert len(rows) == 1
    assert rows[0]["status"] == 499 and rows[0]["error_class"] == "client_disconnected"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "gateway error" in r.getMessage()]


def test_the_quick_check_of_stream_events_never_lets_through_what_the_full_check_refuses():
    # Most streamed events are checked by hand (schemas._PLAIN_EVENT) rather than by pydantic: that
    # check must accept only events the full one accepts, or a malformed event would reach the relay.
    import random

    from pydantic import ValidationError

    from tm_gateway import schemas

    rng = random.Random(7)
    leaves = [None, 0, 1, True, 1.5, "x", "", [], {}, [1], {"a": 1}]
    names = ["content", "tool_calls", "role", "text", "type", "partial_json", "stop_reason", "index", "x"]

    def value(depth: int) -> object:
        r = rng.random()
        if depth < 3 and r < 0.3:
            return {rng.choice(names): value(depth + 1) for _ in range(rng.randint(0, 3))}
        if depth < 3 and r < 0.4:
            return [value(depth + 1) for _ in range(rng.randint(0, 2))]
        return rng.choice(leaves)

    def event() -> dict:
        d: dict = {}
        for k in rng.sample(["choices", "usage", "id", "type", "index", "delta", "message", "content_block"],
                            rng.randint(0, 4)):
            if k == "choices" and rng.random() < 0.6:
                d[k] = [{c: ({"content": rng.choice([None, "t", 1]), **({"tool_calls": value(2)} if rng.random() < 0.2
                                                                        else {})} if c == "delta" and rng.random() < 0.7
                             else value(1))
                         for c in rng.sample(["index", "delta", "finish_reason", "x"], rng.randint(0, 4))}
                        for _ in range(rng.randint(0, 2))]
            elif k == "delta" and rng.random() < 0.6:
                d[k] = {f: value(2) for f in rng.sample(["type", "text", "partial_json", "stop_reason", "x"],
                                                         rng.randint(0, 4))}
            else:
                d[k] = value(1)
        return d

    quick = 0
    for _ in range(20_000):
        d = event()
        for kind in ("openai", "anthropic"):
            if schemas._PLAIN_EVENT[kind](d):
                quick += 1
                try:
                    schemas._EVENTS[kind].validate_python(d)
                except ValidationError as err:
                    raise AssertionError(f"the quick check let through a {kind} event the full check refuses: {d}"
                                         ) from err
    assert quick > 5_000  # the quick path is taken, so the comparison means something
    # The common events themselves take it.
    assert schemas._PLAIN_EVENT["openai"]({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
    assert schemas._PLAIN_EVENT["anthropic"]({"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": "hi"}})
