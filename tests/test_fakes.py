"""The fakes must speak the real protocols: drive them with the official SDKs, not hand-rolled HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import httpx
import openai
import posthog
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `.venv/bin/pytest` puts tests/ (not the repo root) on sys.path
    sys.path.insert(0, str(ROOT))

from tests.fakes import FakePostHog, FakeUpstream, ToolCall, echo_responder, free_port  # noqa: E402

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def _server():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(_server: FakeUpstream):
    # One server per module keeps the file fast; restore every knob a test may turn.
    yield _server
    _server.reset()
    _server.responder = echo_responder
    _server.api_keys = None
    _server.max_context = None
    _server.chunk_delay = 0.0
    _server.words_per_chunk = 1


def oai(fake: FakeUpstream, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_url, api_key=key, max_retries=0, **kw)


def ant(fake: FakeUpstream, key: str = KEY, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, api_key=key, max_retries=0, **kw)


USER = [{"role": "user", "content": "hello there world"}]


def weather(fmt: str, body: dict):
    return ToolCall("get_weather", {"city": "Paris", "unit": "celsius"})


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# ---------------------------------------------------------------- OpenAI


def test_openai_non_stream(fake):
    r = oai(fake).chat.completions.create(model="llama3", messages=USER)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "llama3"
    assert r.choices[0].message.content == "echo: hello there world"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    rec = fake.requests[-1]
    assert rec.path == "/v1/chat/completions" and rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.body["messages"] == USER


def test_openai_stream_with_usage(fake):
    fake.words_per_chunk = 2
    chunks = list(oai(fake).chat.completions.create(
        model="llama3", messages=USER, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 3


def test_openai_stream_without_usage_and_length(fake):
    chunks = list(oai(fake).chat.completions.create(model="m", messages=USER, stream=True, max_tokens=2))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hello"
    assert chunks[-1].choices[0].finish_reason == "length"
    r = oai(fake).chat.completions.create(model="m", messages=USER, max_completion_tokens=3)
    assert r.choices[0].message.content == "echo: hello there" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_openai_tool_call(fake):
    fake.responder = weather
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = oai(fake).chat.completions.create(model="m", messages=USER, tools=tools)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    call = r.choices[0].message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}

    name, args, finish = None, "", None
    for c in oai(fake).chat.completions.create(model="m", messages=USER, tools=tools, stream=True):
        for tc in c.choices[0].delta.tool_calls or ():
            assert tc.index == 0
            name = name or (tc.function.name if tc.function else None)
            args += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Paris", "unit": "celsius"}
    assert finish == "tool_calls"


def test_openai_models_and_health(fake):
    oai(fake).chat.completions.create(model="seen-model", messages=USER)
    ids = [m.id for m in oai(fake).models.list()]
    assert ids == ["fake-model", "seen-model"]
    assert http_json("GET", fake.url + "/health")[2] == {"status": "ok"}


# ---------------------------------------------------------------- Anthropic


def test_anthropic_non_stream(fake):
    m = ant(fake).messages.create(model="claude-x", max_tokens=100, system="be terse", messages=USER)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "claude-x"
    assert m.content[0].type == "text" and m.content[0].text == "echo: hello there world"
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (5, 4)
    assert m.usage.cache_creation_input_tokens == 0 and m.usage.cache_read_input_tokens == 0
    # anthropic 2.x sends api_key as a bearer token, not x-api-key
    assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert fake.requests[-1].headers["anthropic-version"]


def test_anthropic_block_content_and_max_tokens(fake):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "one two "}, {"type": "text", "text": "three"}]}]
    m = ant(fake).messages.create(model="c", max_tokens=2, messages=msgs)
    assert m.content[0].text == "echo: one" and m.stop_reason == "max_tokens" and m.usage.output_tokens == 2


def test_anthropic_stream(fake):
    fake.chunk_delay = 0.001
    with ant(fake).messages.stream(model="c", max_tokens=100, messages=USER) as s:
        deltas = list(s.text_stream)
        final = s.get_final_message()
    assert deltas == ["echo:", " hello", " there", " world"]
    assert final.content[0].text == "echo: hello there world" and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 3 and final.usage.output_tokens == 4


def test_anthropic_raw_sse_sequence(fake):
    with httpx.stream("POST", fake.url + "/v1/messages",
                      json={"model": "c", "max_tokens": 10, "stream": True, "messages": USER}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["request-id"].startswith("req_")
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 4,
                      "content_block_stop", "message_delta", "message_stop"]


def test_anthropic_tool_use(fake):
    fake.responder = weather
    m = ant(fake).messages.create(model="c", max_tokens=100, messages=USER,
                                  tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    block = m.content[0]
    assert m.stop_reason == "tool_use" and block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather" and block.input == {"city": "Paris", "unit": "celsius"}
    with ant(fake).messages.stream(model="c", max_tokens=100, messages=USER) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris", "unit": "celsius"}


def test_anthropic_prompt_caching(fake):
    system = [{"type": "text", "text": "a b c d e f g h", "cache_control": {"type": "ephemeral"}}]
    first = ant(fake).messages.create(model="c", max_tokens=50, system=system, messages=USER)
    second = ant(fake).messages.create(model="c", max_tokens=50, system=system,
                                       messages=[{"role": "user", "content": "other question"}])
    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (8, 0)
    assert first.usage.input_tokens == 3
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (0, 8)
    assert second.usage.input_tokens == 2
    with ant(fake).messages.stream(model="c", max_tokens=50, system=system, messages=USER) as s:
        assert s.get_final_message().usage.cache_read_input_tokens == 8


def test_anthropic_auth_headers_and_models(fake):
    fake.api_keys = {KEY}
    m = anthropic.Anthropic(base_url=fake.url, auth_token=KEY, max_retries=0).messages.create(
        model="c", max_tokens=5, messages=USER)
    assert m.content[0].text.startswith("echo:")
    req = {"model": "c", "max_tokens": 5, "messages": USER}
    status, headers, body = http_json("POST", fake.url + "/v1/messages", req, {"x-api-key": KEY})
    assert status == 200 and body["type"] == "message"
    status, headers, body = http_json("POST", fake.url + "/v1/messages", req, {"x-api-key": "nope"})
    assert status == 401 and body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    assert headers["request-id"] == body["request_id"]
    status, _, body = http_json("POST", fake.url + "/v1/messages", req)
    assert status == 401 and body["error"]["message"] == "x-api-key header is required"
    page = ant(fake).models.list()
    assert [x.id for x in page.data] == ["fake-model", "c"]


def test_anthropic_validation(fake):
    status, headers, body = http_json("POST", fake.url + "/v1/messages", {"model": "c", "messages": USER})
    assert status == 400 and body["type"] == "error"
    assert body["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    with pytest.raises(anthropic.BadRequestError) as ei:
        ant(fake).messages.create(model="c", max_tokens=5, messages="nope")  # type: ignore[arg-type]
    assert "messages" in str(ei.value)


# ---------------------------------------------------------------- failures


def test_rate_limit(fake):
    fake.fail(429, retry_after=7)
    with pytest.raises(openai.RateLimitError) as ei:
        oai(fake).chat.completions.create(model="m", messages=USER)
    assert ei.value.status_code == 429 and ei.value.response.headers["retry-after"] == "7"
    assert ei.value.code == "rate_limit_exceeded"
    fake.fail(429, times=2)
    for _ in range(2):
        with pytest.raises(anthropic.RateLimitError) as ai:
            ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
        assert ai.value.status_code == 429 and ai.value.type == "rate_limit_error"
        assert ai.value.request_id.startswith("req_")
    # expired after `times`
    assert ant(fake).messages.create(model="c", max_tokens=5, messages=USER).stop_reason == "end_turn"


def test_server_errors(fake):
    fake.fail(503, message="down for a bit")
    with pytest.raises(openai.InternalServerError) as ei:
        oai(fake).chat.completions.create(model="m", messages=USER)
    assert ei.value.status_code == 503 and "down for a bit" in str(ei.value)
    fake.fail(503)
    with pytest.raises(anthropic.APIStatusError) as ai:
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
    assert ai.value.status_code == 503 and isinstance(ai.value, anthropic.InternalServerError)
    fake.fail(529)
    with pytest.raises(anthropic.InternalServerError) as ai:
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
    assert ai.value.status_code == 529 and ai.value.body["error"]["type"] == "overloaded_error"


def test_failure_model_filter(fake):
    fake.fail(500, model="bad")
    assert oai(fake).chat.completions.create(model="good", messages=USER).choices[0].message.content
    with pytest.raises(openai.InternalServerError):
        oai(fake).chat.completions.create(model="bad", messages=USER)
    assert oai(fake).chat.completions.create(model="bad", messages=USER).choices[0].finish_reason == "stop"


def test_stall_timeout(fake):
    fake.stall(2, times=2)
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai(fake, timeout=0.2).chat.completions.create(model="m", messages=USER)
    with pytest.raises(anthropic.APITimeoutError):
        ant(fake, timeout=0.2).messages.create(model="c", max_tokens=5, messages=USER)
    assert time.monotonic() - t0 < 1.5


def test_stall_then_answer(fake):
    fake.stall(0.2)
    t0 = time.monotonic()
    oai(fake).chat.completions.create(model="m", messages=USER)
    assert time.monotonic() - t0 >= 0.2


def test_context_length(fake):
    fake.max_context = 2
    with pytest.raises(openai.BadRequestError) as ei:
        oai(fake).chat.completions.create(model="m", messages=USER)
    assert ei.value.code == "context_length_exceeded"
    assert "maximum context length is 2 tokens" in str(ei.value) and "resulted in 3 tokens" in str(ei.value)
    with pytest.raises(anthropic.BadRequestError) as ai:
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
    assert "prompt is too long: 3 tokens > 2 maximum" in str(ai.value)
    assert ai.value.type == "invalid_request_error"


def test_bad_key(fake):
    fake.api_keys = {KEY}
    with pytest.raises(openai.AuthenticationError) as ei:
        oai(fake, key="wrong").chat.completions.create(model="m", messages=USER)
    assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
    assert ei.value.body["type"] == "invalid_request_error" and ei.value.body["param"] is None
    with pytest.raises(anthropic.AuthenticationError) as ai:
        ant(fake, key="wrong").messages.create(model="c", max_tokens=5, messages=USER)
    assert ai.value.body["error"]["type"] == "authentication_error"
    assert oai(fake).chat.completions.create(model="m", messages=USER).choices


def test_drop_mid_stream(fake):
    fake.drop(after_chunks=2)
    got: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for c in oai(fake).chat.completions.create(model="m", messages=USER, stream=True):
            got.append(c.choices[0].delta.content or "")
            assert c.choices[0].finish_reason is None
    assert "".join(got) == "echo: hello"

    fake.drop(after_chunks=1)
    texts: list[str] = []
    # anthropic 2.x lets the transport's RemoteProtocolError ("incomplete chunked read") escape unwrapped
    with pytest.raises(Exception, match="incomplete|Connection error"):
        with ant(fake).messages.stream(model="c", max_tokens=50, messages=USER) as s:
            texts.extend(s.text_stream)
    assert texts == ["echo:"]


def test_drop_non_stream(fake):
    fake.drop()
    with pytest.raises(openai.APIConnectionError):
        oai(fake).chat.completions.create(model="m", messages=USER)
    fake.drop()
    with pytest.raises(anthropic.APIConnectionError):
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)


def test_cut_body_whole_answers_only(fake):
    fake.cut_body(times=2)
    with pytest.raises(openai.APIConnectionError):
        oai(fake).chat.completions.create(model="m", messages=USER)
    with pytest.raises(anthropic.APIConnectionError):
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
    fake.cut_body()
    chunks = list(oai(fake).chat.completions.create(model="m", messages=USER, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_threads(fake):
    client = oai(fake)
    results: list[str] = []

    def call(i: int) -> None:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"n{i}"}])
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(f"echo: n{i}" for i in range(16))
    assert len(fake.requests) == 16


def test_explicit_port_and_cli():
    port = free_port()
    with FakeUpstream(port=port, api_keys={KEY}) as f:
        assert f.url == f"http://127.0.0.1:{port}" and f.openai_url.endswith(f"{port}/v1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes", "--port", str(port), "--chunk-delay", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert b"listening" in proc.stdout.readline()
        r = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert r.chat.completions.create(model="m", messages=USER).choices[0].message.content.startswith("echo")
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_cli_fault_hits_every_request_for_its_model():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes", "--port", str(port), "--fault", "429",
                             "--fault-model", "bad", "--retry-after", "3"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert b"listening" in proc.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as ei:
                client.chat.completions.create(model="bad", messages=USER)
            assert ei.value.response.headers["retry-after"] == "3"
        assert client.chat.completions.create(model="good", messages=USER).choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# ---------------------------------------------------------------- PostHog


def test_posthog_sync_capture():
    with FakePostHog() as ph:
        client = posthog.Posthog(project_api_key="phc_test", host=ph.url, sync_mode=True)
        client.capture("llm_request", distinct_id="user-1", properties={"model": "m", "tokens": 7})
        (event,) = ph.wait_for(1)
        assert event["event"] == "llm_request" and event["distinct_id"] == "user-1"
        assert event["properties"]["model"] == "m" and event["properties"]["tokens"] == 7
        assert event["api_key"] == "phc_test"
        client.shutdown()


def test_posthog_batched_gzip_capture():
    with FakePostHog() as ph:
        client = posthog.Posthog(project_api_key="phc_test", host=ph.url, gzip=True, flush_interval=0.05)
        for i in range(3):
            client.capture("ev", distinct_id=f"u{i}", properties={"i": i})
        client.flush()
        events = ph.wait_for(3)
        client.shutdown()
        assert sorted(e["properties"]["i"] for e in events) == [0, 1, 2]
        assert any(r.headers.get("content-encoding") == "gzip" for r in ph.requests)


def test_posthog_capture_v1():
    with FakePostHog() as ph:
        client = posthog.Posthog(project_api_key="phc_test", host=ph.url, sync_mode=True, capture_mode="v1")
        client.capture("v1_event", distinct_id="u", properties={"a": 1})
        (event,) = ph.wait_for(1)
        assert event["event"] == "v1_event" and event["properties"]["a"] == 1
        assert ph.requests[-1].path == "/i/v1/analytics/events"
        client.shutdown()
