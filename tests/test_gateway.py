"""The gateway end to end: the official OpenAI and Anthropic SDKs through both inbound formats to both kinds
of provider, streaming and not, and the one row each request leaves, checked column by column."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.conftest import CLAUDE_PRICE, LOCAL_PRICE, Gateway
from tests.fakes import ToolCall


def oa(gw: Gateway, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, **kw)


def an(gw: Gateway, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, **kw)


def price(p: dict, i: int, o: int, cr: int = 0, cw: int = 0) -> float:
    return (i * p["input"] + o * p["output"] + cr * p.get("cache_read", p["input"])
            + cw * p.get("cache_write", p["input"])) / 1e6


# Words in, words out: the fakes count one token per whitespace-separated word.
PROMPT = "name three primes please"
ECHO = "echo: " + PROMPT


@pytest.mark.parametrize("model,provider,upstream,p", [
    ("local-test", "local", "tiny-local", LOCAL_PRICE),
    ("claude-test", "anthropic", "claude-upstream", CLAUDE_PRICE),
])
def test_openai_sdk_non_streaming(gateway: Gateway, upstreams, model, provider, upstream, p):
    raw = oa(gateway).chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
        max_tokens=50,
        extra_headers={"x-tm-agent": "tester", "x-tm-session": "sess-1"},
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == ECHO
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == 6 and resp.usage.completion_tokens == 5
    assert raw.headers["x-tm-model"] == model
    assert raw.headers["x-tm-provider"] == provider
    cost = price(p, 6, 5)
    assert float(raw.headers["x-tm-cost-usd"]) == pytest.approx(cost, abs=1e-8)

    [row] = gateway.rows()
    assert str(row["id"]) == raw.headers["x-tm-request-id"]
    assert row["user_id"] == "alice"
    assert row["api_format"] == "openai"
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["session_id"] == "sess-1"
    assert row["agent"] == "tester"
    assert (row["requested_model"], row["model"], row["provider"], row["upstream_model"]) == (
        model, model, provider, upstream)
    assert row["stream"] is False
    assert row["system"] == "be brief"
    assert row["prompt"] == PROMPT
    assert row["messages"][-1] == {"role": "user", "content": PROMPT}
    assert row["params"] == {"max_tokens": 50}
    assert row["response_text"] == ECHO
    assert row["finish_reason"] in ("stop", "end_turn")
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]) == (
        6, 5, 0, 0)
    assert row["cost_usd"] == pytest.approx(cost, abs=1e-12)
    assert row["status"] == 200 and row["error_class"] is None
    assert row["latency_ms"] > 0 and row["ttft_ms"] is None

    # What reached the provider: its own model name, its own format, the provider key only there.
    anth, local = upstreams
    sent = (local if provider == "local" else anth).requests[-1]
    assert sent.body["model"] == upstream
    assert sent.path == ("/v1/chat/completions" if provider == "local" else "/v1/messages")
    if provider == "anthropic":
        assert sent.body["system"] == "be brief"
        assert sent.headers["x-api-key"] != gateway.key


@pytest.mark.parametrize("model,p", [("local-test", LOCAL_PRICE), ("claude-test", CLAUDE_PRICE)])
def test_openai_sdk_streaming(gateway: Gateway, model, p):
    client = oa(gateway)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ECHO
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == 5

    # Without include_usage the client sees no usage chunk, yet the row still has the tokens.
    plain = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                stream=True))
    assert all(c.choices for c in plain)

    rows = gateway.rows()
    assert len(rows) == 2
    for row in rows:
        assert row["stream"] is True and row["status"] == 200
        assert row["response_text"] == ECHO
        assert (row["input_tokens"], row["output_tokens"]) == (4, 5)
        assert row["cost_usd"] == pytest.approx(price(p, 4, 5), abs=1e-12)
        assert 0 < row["ttft_ms"] <= row["latency_ms"]


@pytest.mark.parametrize("model,p", [("claude-test", CLAUDE_PRICE), ("local-test", LOCAL_PRICE)])
def test_anthropic_sdk_non_streaming_and_streaming(gateway: Gateway, model, p):
    client = an(gateway)
    msg = client.messages.create(model=model, max_tokens=100, system="be brief",
                                 messages=[{"role": "user", "content": PROMPT}])
    assert msg.content[0].text == ECHO
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (6, 5)

    with client.messages.stream(model=model, max_tokens=100,
                                messages=[{"role": "user", "content": PROMPT}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == ECHO
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5

    first, second = gateway.rows()
    assert first["api_format"] == second["api_format"] == "anthropic"
    assert first["endpoint"] == "/v1/messages"
    assert first["system"] == "be brief" and second["system"] is None
    assert (first["stream"], second["stream"]) == (False, True)
    assert first["response_text"] == second["response_text"] == ECHO
    assert (second["input_tokens"], second["output_tokens"]) == (4, 5)
    assert first["cost_usd"] == pytest.approx(price(p, 6, 5), abs=1e-12)
    assert second["cost_usd"] == pytest.approx(price(p, 4, 5), abs=1e-12)
    assert second["ttft_ms"] is not None and first["ttft_ms"] is None


def test_prompt_caching_tokens_are_priced_as_such(gateway: Gateway):
    client = an(gateway)
    system = [{"type": "text", "text": "a long shared preamble " * 5, "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):
        client.messages.create(model="claude-test", max_tokens=50, system=system,
                               messages=[{"role": "user", "content": PROMPT}])
    write, read = gateway.rows()
    assert write["cache_write_tokens"] == 20 and write["cache_read_tokens"] == 0
    assert read["cache_read_tokens"] == 20 and read["cache_write_tokens"] == 0
    assert write["input_tokens"] == read["input_tokens"] == 4
    assert write["cost_usd"] == pytest.approx(price(CLAUDE_PRICE, 4, 5, cw=20), abs=1e-12)
    assert read["cost_usd"] == pytest.approx(price(CLAUDE_PRICE, 4, 5, cr=20), abs=1e-12)


def test_tool_calls_cross_both_ways(gateway: Gateway, upstreams):
    anth, local = upstreams
    for fake in (anth, local):
        fake.responder = lambda fmt, body: ToolCall("get_weather", {"city": "Oslo"}) if body.get("tools") else "ok"
    tool_oa = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    # OpenAI client -> Anthropic provider
    resp = oa(gateway).chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[tool_oa])
    call = resp.choices[0].message.tool_calls[0]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert anth.requests[-1].body["tools"][0]["input_schema"]["properties"]["city"] == {"type": "string"}

    # Anthropic client -> OpenAI-compatible provider, streamed
    tool_an = {"name": "get_weather", "description": "weather",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    with an(gateway).messages.stream(model="local-test", max_tokens=100, tools=[tool_an],
                                     messages=[{"role": "user", "content": "weather in Oslo?"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    block = final.content[-1]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Oslo"}
    assert local.requests[-1].body["tools"][0]["function"]["name"] == "get_weather"

    rows = gateway.rows()
    assert [r["finish_reason"] for r in rows] == ["tool_use", "tool_calls"]
    assert all("get_weather" in r["response_text"] for r in rows)


def test_models_listing_in_both_formats(gateway: Gateway):
    # `auto` (and any presets) first: what a client lists is what it may ask for.
    models = oa(gateway).models.list().data
    assert [m.id for m in models] == ["auto", "claude-test", "local-test"]
    assert [m.owned_by for m in models] == ["token-machine", "anthropic", "local"]
    page = an(gateway).models.list()
    assert [m.id for m in page.data] == ["auto", "claude-test", "local-test"]


def test_healthz(gateway: Gateway):
    r = httpx.get(gateway.url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
