"""Anthropic prompt caching done by the gateway: a breakpoint added to a long system prompt or tool list
that has none (cache.prompt_caching: auto), bodies left alone otherwise, and cache reads and writes priced
in the row; through the official SDKs, the fake Anthropic reporting cache tokens as the real API does."""

from __future__ import annotations

import anthropic
import openai
import psycopg
import pytest

from tests.conftest import CLAUDE_PRICE, Gateway, make_config, start_gateway
from tm_gateway import keys

LONG_SYSTEM = "You are a careful reviewer of pull requests for a payments company. " * 80  # ~1,400 tokens
SHORT_SYSTEM = "You are terse."


@pytest.fixture
def caching(db_url, upstreams, tmp_path):
    started: list[Gateway] = []

    def start(mode: str = "auto", **cache) -> Gateway:
        anthropic_fake, local = upstreams
        with psycopg.connect(db_url) as conn:
            key, _ = keys.create_key(conn, "alice")
        config = make_config(anthropic_fake.url, local.openai_url,
                             cache={"enabled": False, "prompt_caching": mode, **cache},
                             limits={"loop": {"repeats": 0}})
        app, served = start_gateway(config, db_url, tmp_path / mode)
        gw = Gateway(url=served.url, key=key, user="alice", db_url=db_url, app=app, served=served)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.served.stop()


def an(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def ask(gw: Gateway, system=LONG_SYSTEM, question: str = "Is this diff safe?", **kw):
    return an(gw).messages.create(model="claude-test", max_tokens=30, system=system,
                                  messages=[{"role": "user", "content": question}], **kw)


def sent_bodies(upstreams) -> list[dict]:
    anthropic_fake, _ = upstreams
    return [r.body for r in anthropic_fake.requests if r.path.endswith("/messages")]


def price(row: dict) -> float:
    p = CLAUDE_PRICE
    return (row["input_tokens"] * p["input"] + row["output_tokens"] * p["output"]
            + row["cache_read_tokens"] * p["cache_read"] + row["cache_write_tokens"] * p["cache_write"]) / 1e6


def test_auto_adds_a_breakpoint_to_a_long_system_prompt_and_prices_the_cache(caching, upstreams):
    gw = caching("auto")
    first = ask(gw)
    second = ask(gw, question="And this one?")
    bodies = sent_bodies(upstreams)
    assert bodies[0]["system"] == [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    # The client sees Anthropic's own usage: a write on the first turn, a read on the second.
    assert first.usage.cache_creation_input_tokens > 500 and not first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    one, two = gw.rows()
    assert one["cache_write_tokens"] == first.usage.cache_creation_input_tokens and one["cache_read_tokens"] == 0
    assert two["cache_read_tokens"] == first.usage.cache_creation_input_tokens and two["cache_write_tokens"] == 0
    for row in (one, two):
        assert row["cost_usd"] == pytest.approx(price(row))
    # Read at a tenth of the input price: the second turn costs far less than the first.
    assert two["cost_usd"] < one["cost_usd"] / 5


def test_auto_caches_an_openai_callers_system_prompt_on_a_claude_model(caching, upstreams):
    gw = caching("auto")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    for q in ("first question", "second question"):
        client.chat.completions.create(model="claude-test", max_tokens=20, messages=[
            {"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": q}])
    bodies = sent_bodies(upstreams)
    assert bodies[0]["system"][-1]["cache_control"] == {"type": "ephemeral"}
    one, two = gw.rows()
    assert one["cache_write_tokens"] > 500 and two["cache_read_tokens"] == one["cache_write_tokens"]


def test_auto_puts_the_breakpoint_on_a_long_tool_list_without_a_system_prompt(caching, upstreams):
    gw = caching("auto")
    tools = [{"name": f"tool_{i}", "description": "Looks something up in the company wiki. " * 6,
              "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}} for i in range(20)]
    an(gw).messages.create(model="claude-test", max_tokens=20, tools=tools,
                           messages=[{"role": "user", "content": "find the holiday policy"}])
    [body] = sent_bodies(upstreams)
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert all("cache_control" not in t for t in body["tools"][:-1])
    assert "system" not in body


def test_auto_leaves_short_prompts_and_clients_own_breakpoints_alone(caching, upstreams):
    gw = caching("auto")
    ask(gw, system=SHORT_SYSTEM)
    own = [{"type": "text", "text": LONG_SYSTEM},
           {"type": "text", "text": "Today's rules.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    ask(gw, system=own)
    a_short, a_own = sent_bodies(upstreams)
    assert a_short["system"] == SHORT_SYSTEM
    assert a_own["system"] == own


@pytest.mark.parametrize("mode", ["passthrough", "off"])
def test_passthrough_and_off_send_the_body_as_it_came(caching, upstreams, mode):
    gw = caching(mode)
    ask(gw)
    [body] = sent_bodies(upstreams)
    assert body["system"] == LONG_SYSTEM
    [row] = gw.rows()
    assert row["cache_write_tokens"] == 0 and row["cache_read_tokens"] == 0


def test_min_tokens_is_configurable(caching, upstreams):
    gw = caching("auto", prompt_caching_min_tokens=100_000)
    ask(gw)
    [body] = sent_bodies(upstreams)
    assert body["system"] == LONG_SYSTEM
