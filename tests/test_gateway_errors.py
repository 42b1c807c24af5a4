"""What goes wrong, and what the caller and the log see: bad keys, bad input, failing or stalling providers,
streams cut by either side. Every request with a valid key leaves exactly one row; secrets leave none."""

from __future__ import annotations

import socket
import time

import anthropic
import httpx
import openai
import psycopg
import pytest

from tests.conftest import ANTHROPIC_TEST_KEY, Gateway, make_config, start_gateway
from tm_gateway import keys

pytestmark = pytest.mark.slow  # the file takes over 20 s: out of the fast tier


def oa(gw: Gateway, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, **kw)


def an(gw: Gateway, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, **kw)


MSG = [{"role": "user", "content": "hello there"}]


def test_bad_or_missing_key_gets_401_in_each_format_and_leaves_no_row(gateway: Gateway):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="tm-wrong", max_retries=0).chat.completions.create(
            model="local-test", messages=MSG)
    assert e.value.status_code == 401 and "API key" in e.value.message
    with pytest.raises(anthropic.AuthenticationError) as e2:
        anthropic.Anthropic(base_url=gateway.url, api_key="tm-wrong", max_retries=0).messages.create(
            model="claude-test", max_tokens=10, messages=MSG)
    assert e2.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(gateway.url + "/v1/messages", json={"model": "claude-test"})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert gateway.rows() == []


def test_x_api_key_header_is_accepted_on_the_openai_route(gateway: Gateway):
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={"x-api-key": gateway.key},
                   json={"model": "local-test", "messages": MSG})
    assert r.status_code == 200


@pytest.mark.parametrize("fmt,path", [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages")])
@pytest.mark.parametrize("body,status,needle,error_class", [
    (b"{not json", 400, "not valid JSON", "invalid_json"),
    (b"[1, 2]", 400, "JSON object", "invalid_request"),
    (b'{"model": "local-test"}', 400, "'messages'", "invalid_request"),
    (b'{"model": "local-test", "messages": []}', 400, "'messages'", "invalid_request"),
    (b'{"model": "local-test", "messages": "hi", "max_tokens": 5}', 400, "'messages'", "invalid_request"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "'model'", "invalid_request"),
    (b'{"model": "local-test", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]}', 400,
     "messages[0].content", "invalid_request"),
    (b'{"model": "local-test", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
     400, "'stream'", "invalid_request"),
    (b'{"model": "local-test", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}', 400,
     "'max_tokens'", "invalid_request"),
    (b'{"model": "gpt-9", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', 404,
     "gpt-9", "model_not_found"),
])
def test_bad_input_gets_a_clear_4xx_in_the_callers_format_and_is_logged(
        gateway: Gateway, fmt, path, body, status, needle, error_class):
    r = httpx.post(gateway.url + path, content=body,
                   headers={"authorization": f"Bearer {gateway.key}", "content-type": "application/json"})
    assert r.status_code == status
    err = r.json()
    message = err["error"]["message"]
    if fmt == "anthropic":
        assert err["type"] == "error" and err["error"]["type"] in ("invalid_request_error", "not_found_error")
    else:
        assert err["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert needle in message
    [row] = gateway.rows()
    assert (row["status"], row["error_class"], row["api_format"]) == (status, error_class, fmt)
    assert row["error_message"] == message
    assert str(row["id"]) == r.headers["x-tm-request-id"]


def test_a_body_over_the_limit_gets_413_and_a_row(gateway: Gateway):
    huge = "word " * 60_000  # 300 kB against the test limit of 200 kB
    with pytest.raises(openai.APIStatusError) as e:
        oa(gateway).chat.completions.create(model="local-test", messages=[{"role": "user", "content": huge}])
    assert e.value.status_code == 413
    [row] = gateway.rows()
    assert row["status"] == 413 and row["error_class"] == "request_too_large"


def test_a_translation_error_is_a_400_naming_the_field(gateway: Gateway):
    # An OpenAI client whose tool-call arguments are not JSON, bound for Anthropic.
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        oa(gateway).chat.completions.create(model="claude-test", messages=messages)
    assert "arguments" in e.value.message
    assert gateway.rows()[0]["status"] == 400


@pytest.mark.parametrize("status,sdk_error,error_class", [
    (429, "RateLimitError", "upstream_rate_limited"),
    (503, "InternalServerError", "upstream_unavailable"),
    (500, "InternalServerError", "upstream_unavailable"),
    (400, "BadRequestError", "upstream_bad_request"),
])
def test_upstream_errors_pass_back_with_their_real_status(gateway: Gateway, upstreams, status, sdk_error,
                                                          error_class):
    anth, local = upstreams
    # OpenAI client to the Anthropic provider: the error crosses formats; and the same-format way round.
    # (Failing more than once: a single 429 or timeout is retried; these models have no fallbacks.)
    anth.fail(status, message="provider says no", times=3)
    with pytest.raises(getattr(openai, sdk_error)) as e:
        oa(gateway).chat.completions.create(model="claude-test", messages=MSG)
    assert e.value.status_code == status and "provider says no" in e.value.message
    local.fail(status, message="local says no", times=3)
    with pytest.raises(getattr(anthropic, sdk_error)) as e2:
        an(gateway).messages.create(model="local-test", max_tokens=10, messages=MSG)
    assert e2.value.status_code == status and "local says no" in e2.value.message
    rows = gateway.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [(status, error_class)] * 2


def test_provider_keys_never_reach_the_caller_or_the_row(gateway: Gateway, upstreams):
    anth, _ = upstreams
    anth.fail(401, message=f"invalid x-api-key: {ANTHROPIC_TEST_KEY}")
    with pytest.raises(openai.AuthenticationError) as e:
        oa(gateway).chat.completions.create(model="claude-test", messages=MSG)
    assert ANTHROPIC_TEST_KEY not in e.value.message and ANTHROPIC_TEST_KEY[:12] not in e.value.message
    [row] = gateway.rows()
    assert all(ANTHROPIC_TEST_KEY not in str(v) for v in row.values())
    assert all(gateway.key not in str(v) for v in row.values())
    assert row["status"] == 401 and row["error_class"] == "upstream_auth"


def test_stalled_and_unreachable_providers(db_url, upstreams, tmp_path, monkeypatch):
    anth, local = upstreams
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    config = make_config(anth.url, f"http://127.0.0.1:{dead_port}/v1")
    cfg = config.model_copy(update={"providers": {
        **config.providers,
        "anthropic": config.providers["anthropic"].model_copy(update={"timeout_s": 0.5}),
    }})
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "bob")
    app, served = start_gateway(cfg, db_url, tmp_path)
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="local-test", messages=MSG)
        assert e.value.status_code == 502 and "unreachable" in e.value.message
        anth.stall(2.0, times=2)  # the gateway retries a timeout once
        with pytest.raises(openai.APIStatusError) as e2:
            client.chat.completions.create(model="claude-test", messages=MSG)
        assert e2.value.status_code == 504
        assert app.state.proxy.request_log.flush()
        with psycopg.connect(db_url) as conn:
            got = conn.execute("SELECT status, error_class FROM requests ORDER BY ts").fetchall()
        assert got == [(502, "upstream_unreachable"), (504, "upstream_timeout")]
        # A stream that stops past the timeout once begun: too late for another model, still a timeout.
        anth.chunk_delay = 2.0
        with pytest.raises(anthropic.APIError) as e3:
            with anthropic.Anthropic(base_url=served.url, api_key=key, max_retries=0).messages.stream(
                    model="claude-test", max_tokens=50, messages=MSG) as s:
                for _ in s.text_stream:
                    pass
        assert "timeout" in str(e3.value)
        assert app.state.proxy.request_log.flush()
        with psycopg.connect(db_url) as conn:
            last = conn.execute("SELECT status, error_class, error_message FROM requests ORDER BY ts DESC").fetchone()
        assert last == (504, "upstream_timeout", "the provider's stream stalled past its timeout")
    finally:
        served.stop()


def test_a_stream_cut_by_the_client_leaves_a_499_row(gateway: Gateway, upstreams):
    anth, local = upstreams
    local.chunk_delay = 0.05
    local.responder = lambda fmt, body: " ".join(f"w{i}" for i in range(200))
    with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {gateway.key}"},
                      json={"model": "local-test", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # The gateway notices the hang-up, stops reading the provider, and writes the row.
    deadline = time.monotonic() + 5
    rows = []
    while time.monotonic() < deadline and not rows:
        rows = gateway.rows()
        time.sleep(0.05)
    [row] = rows
    assert row["status"] == 499 and row["error_class"] == "client_disconnected"
    assert row["stream"] is True
    assert row["response_text"].startswith("w0") and len(row["response_text"].split()) < 200
    assert row["ttft_ms"] is not None


def test_a_stream_cut_by_the_provider_is_reported_in_the_stream_and_the_row(gateway: Gateway, upstreams):
    anth, local = upstreams
    anth.drop(after_chunks=2)
    with pytest.raises(anthropic.APIError):
        with an(gateway).messages.stream(model="claude-test", max_tokens=50, messages=MSG) as s:
            for _ in s.text_stream:
                pass
    local.drop(after_chunks=2)
    with pytest.raises(openai.APIError):
        for _ in oa(gateway).chat.completions.create(model="local-test", messages=MSG, stream=True):
            pass
    rows = gateway.rows()
    assert [(r["status"], r["error_class"]) for r in rows] == [(502, "upstream_stream_error")] * 2


def test_every_request_leaves_exactly_one_row_under_concurrency(gateway: Gateway, upstreams):
    import concurrent.futures

    _, local = upstreams
    local.fail(503, times=10)

    def call(i: int) -> int:
        r = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gateway.key}"},
                       json={"model": "local-test", "messages": [{"role": "user", "content": f"q{i}"}],
                             "stream": i % 3 == 0}, timeout=30)
        r.read()
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(120)))
    assert statuses.count(503) == 10 and statuses.count(200) == 110
    rows = gateway.rows()
    assert len(rows) == 120
    assert sorted(r["prompt"] for r in rows) == sorted(f"q{i}" for i in range(120))
    assert len({r["id"] for r in rows}) == 120


def test_stopping_the_gateway_flushes_every_row(db_url, upstreams, tmp_path):
    anth, local = upstreams
    config = make_config(anth.url, local.openai_url, log={"flush_interval_ms": 5000, "batch_max_rows": 10_000})
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "carol")
    app, served = start_gateway(config, db_url, tmp_path)
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
    for i in range(25):
        client.chat.completions.create(model="local-test", messages=[{"role": "user", "content": f"n{i}"}])
    served.stop()  # the long flush interval means these rows are still queued until shutdown
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 25


def test_revoked_keys_stop_working_and_new_keys_start_without_a_restart(gateway: Gateway):
    with psycopg.connect(gateway.db_url) as conn:
        new_key, info = keys.create_key(conn, "dave")
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        status = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {new_key}"},
                            json={"model": "local-test", "messages": MSG}).status_code
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200
    with psycopg.connect(gateway.db_url) as conn:
        assert keys.revoke(conn, "dave") == [info.id]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {new_key}"},
                            json={"model": "local-test", "messages": MSG}).status_code
        if status == 401:
            break
        time.sleep(0.05)
    assert status == 401
    assert {r["user_id"] for r in gateway.rows()} == {"dave"}
