"""Quotas acting on routing, through the real gateway and the official SDKs: the loop's shift:<provider> rule
moves `auto` and presets to another model of their chain, and routing.local_preference decides how they use
local models."""

from __future__ import annotations

import time

import openai
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tm_gateway import keys
from tm_gateway.quota_routing import avoid_shifted, with_local_preference
from tm_gateway.rules import Route, Rule, RuleBook
from tm_resources.config import parse_config

SIMPLE = "hi, how are you?"
COMPLEX = ("Implement a thread-safe LRU cache class in Python with O(1) get and put, explain the "
           "concurrency design, and write pytest unit tests covering eviction and concurrent access.")


def _config(anth_url: str, local_url: str, preference: str | None = None):
    data = make_config(anth_url, local_url).model_dump(mode="json")
    data["presets"] = {"tm:pair": ["claude-test", "local-test"], "tm:cheap": ["local-test", "claude-test"]}
    data["routing"] = {"tiers": {"chains": {"SIMPLE": ["local-test"], "MEDIUM": ["local-test", "claude-test"],
                                            "COMPLEX": ["claude-test"], "REASONING": ["claude-test"]}}}
    if preference:
        data["routing"]["local_preference"] = preference
    return parse_config(data)


@pytest.fixture
def served(db_url, upstreams, tmp_path):
    anth, local = upstreams
    started = []

    def start(preference=None):
        with psycopg.connect(db_url) as conn:
            key = keys.create_key(conn, f"u{len(started)}")[0]
        app, srv = start_gateway(_config(anth.url, local.openai_url, preference), db_url, tmp_path / str(len(started)))
        started.append(srv)
        return app, openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)

    yield start
    for srv in started:
        srv.stop()


def ask(client, text, model="auto"):
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])


def test_the_gateway_obeys_a_shift_rule_while_another_model_can_serve(served, db_url):
    app, client = served()
    assert ask(client, COMPLEX, "tm:pair").headers["x-tm-model"] == "claude-test"
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO routing_rules (hour, rule_id, action, status, reason, evidence) VALUES"
                     " (date_trunc('hour', now()), 'shift:anthropic', 'shift', 'active',"
                     " 'anthropic: 96% used, at this rate exhausted in 2.0 h', '{\"provider\": \"anthropic\"}')")
    deadline = time.monotonic() + 10
    while not app.state.proxy.shared.rules.shifted:
        assert time.monotonic() < deadline, "the gateway did not pick the rule up"
        time.sleep(0.05)
    shifted = ask(client, COMPLEX, "tm:pair")
    assert shifted.headers["x-tm-model"] == "local-test" and shifted.headers["x-tm-route"] == "rule:shift:anthropic"
    # A chain with nothing else (COMPLEX: claude-test only) still goes to its model; a named model is untouched.
    assert ask(client, COMPLEX).headers["x-tm-model"] == "claude-test"
    assert ask(client, COMPLEX, "claude-test").headers["x-tm-model"] == "claude-test"
    assert app.state.proxy.request_log.flush()
    rows = query(db_url, "SELECT route, route_reason FROM requests WHERE route = 'rule:shift:anthropic'")
    assert len(rows) == 1 and "claude-test avoided: anthropic: 96% used" in rows[0]["route_reason"]


def test_local_preference_never_keeps_auto_off_local_models(served):
    _, client = served("never")
    simple = ask(client, SIMPLE)
    assert simple.headers["x-tm-model"] == "claude-test"     # SIMPLE's chain is local only: the frontier answers
    assert ask(client, SIMPLE, "tm:cheap").headers["x-tm-model"] == "claude-test"
    assert ask(client, SIMPLE, "local-test").headers["x-tm-model"] == "local-test"   # a named model is the client's call


def test_local_preference_prefer_puts_a_local_model_first(served):
    _, client = served("prefer")
    assert ask(client, COMPLEX).headers["x-tm-model"] == "local-test"
    assert ask(client, COMPLEX, "tm:pair").headers["x-tm-model"] == "local-test"


def test_the_default_keeps_the_chains_as_configured(served):
    _, client = served()
    assert ask(client, SIMPLE).headers["x-tm-model"] == "local-test"
    assert ask(client, COMPLEX).headers["x-tm-model"] == "claude-test"


@pytest.mark.parametrize("tier, model, chain", [("SIMPLE", "local-test", ("claude-test",)),
                                                ("COMPLEX", "claude-test", ())])
def test_simple_only_uses_local_models_for_simple_prompts_only(tier, model, chain):
    config = _config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", "simple-only")
    route = Route("local-test", f"tier:{tier}", "tier", chain=("claude-test",))
    got = with_local_preference(route, config, "alice", lambda: tier)
    assert (got.model, got.chain) == (model, chain)


def test_a_throttled_user_stays_local_whatever_the_preference():
    config = _config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", "never")
    route = Route("local-test", "rule:throttle:alice", "throttled")
    assert with_local_preference(route, config, "alice", lambda: "COMPLEX") == route


def test_a_shift_uses_the_models_own_fallbacks_and_keeps_it_last():
    data = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1").model_dump(mode="json")
    data["models"]["claude-test"]["fallbacks"] = ["local-test"]
    config = parse_config(data)
    book = RuleBook.from_rules([Rule("shift:anthropic", "shift", None, None, None, None, "critical")])
    got = avoid_shifted(Route("claude-test", "tier:COMPLEX", "tier"), book, config, "alice")
    assert (got.model, got.chain, got.route) == ("local-test", ("claude-test",), "rule:shift:anthropic")
    both = RuleBook.from_rules([Rule("shift:anthropic", "shift", None, None, None, None, "critical"),
                                Rule("shift:local", "shift", None, None, None, None, "critical")])
    assert avoid_shifted(Route("claude-test", "tier:COMPLEX", "tier"), both, config, "alice").model == "claude-test"
