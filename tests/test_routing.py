"""Choosing for `auto` when no rule applies, through the real gateway: the tier classifier's chains,
premium models left out for users without them, and cascades (cheap model first, the quick gate,
the frontier when the gate fails) with both attempts logged and linked."""

from __future__ import annotations

import time

import anthropic
import openai
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tests.fakes import echo_responder
from tests.support import REFUSAL, refuses_when_asked
from tm_gateway import keys
from tm_resources.config import parse_config


@pytest.fixture
def gw(db_url, upstreams, tmp_path):
    anth, local = upstreams
    local.responder = refuses_when_asked
    data = make_config(anth.url, local.openai_url).model_dump(mode="json")
    data["models"]["claude-opus-test"] = {"provider": "anthropic", "upstream": "opus-up", "tier": "premium",
                                         "context_window": 200000, "price": {"input": 15, "output": 75}}
    data["users"] = {"boss": {"premium": True}, "writer": {"model": "claude-test"}}
    data["routing"] = {
        "tiers": {"chains": {"SIMPLE": ["local-test"], "MEDIUM": ["local-test"],
                             "COMPLEX": ["claude-opus-test", "claude-test"], "REASONING": ["claude-test"]}},
        "cascade": {"tiers": ["SIMPLE", "MEDIUM"]},
    }
    config = parse_config(data)
    with psycopg.connect(db_url) as conn:
        k = {u: keys.create_key(conn, u)[0] for u in ("staff", "boss", "writer")}
    app, served = start_gateway(config, db_url, tmp_path)

    class G:
        def __init__(self):
            self.url, self.keys_, self.anthropic, self.local = served.url, k, anth, local
            self.app, self.db_url = app, db_url

        def openai(self, user="staff"):
            return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys_[user], max_retries=0)

        def rows(self):
            assert app.state.proxy.request_log.flush()
            return query(db_url, "SELECT * FROM requests ORDER BY ts, id")

    try:
        yield G()
    finally:
        served.stop()


def ask(client, text, **kw):
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], **kw)


REASONING = "Prove that the square root of 2 is irrational. Justify each step rigorously."
COMPLEX = ("Implement a thread-safe LRU cache class in Python with O(1) get and put, explain the "
           "concurrency design, and write pytest unit tests covering eviction and concurrent access.")


def test_each_tier_goes_to_its_chain(gw):
    reasoning = ask(gw.openai(), REASONING)
    assert reasoning.headers["x-tm-route"] == "tier:REASONING"
    assert reasoning.headers["x-tm-model"] == "claude-test"
    rows = gw.rows()
    assert rows[-1]["route"] == "tier:REASONING" and "confidence" in rows[-1]["route_reason"]
    # A user's own model for `auto` comes before the classifier.
    assert ask(gw.openai("writer"), REASONING).headers["x-tm-route"] == "user:writer"


def test_premium_models_are_left_out_of_a_chain_for_users_without_them(gw):
    staff = ask(gw.openai("staff"), COMPLEX)
    assert staff.headers["x-tm-route"] == "tier:COMPLEX"
    assert staff.headers["x-tm-model"] == "claude-test"  # the premium first choice skipped, no 403
    boss = ask(gw.openai("boss"), COMPLEX)
    assert boss.headers["x-tm-model"] == "claude-opus-test"
    assert "premium models left out" in gw.rows()[0]["route_reason"]


def test_a_cascade_answer_that_passes_the_gate_is_the_only_attempt(gw):
    raw = ask(gw.openai(), "hi there, how are you?")
    assert raw.headers["x-tm-route"] == "cascade" and raw.headers["x-tm-cascade"] == "passed"
    assert raw.headers["x-tm-model"] == "local-test"
    assert raw.parse().choices[0].message.content == "echo: hi there, how are you?"
    [row] = gw.rows()
    assert row["served"] is True and row["model"] == "local-test" and row["parent_id"] is None
    assert "passed the gate" in row["route_reason"] and row["output_tokens"] > 0
    assert len(gw.anthropic.requests) == 0


def test_a_cascade_escalates_when_the_cheap_answer_fails_the_gate(gw):
    raw = ask(gw.openai(), "please refuse this one")
    assert raw.headers["x-tm-cascade"] == "escalated: refusal"
    assert raw.headers["x-tm-model"] == "claude-test"
    assert raw.parse().choices[0].message.content == "echo: please refuse this one"
    first, answer = sorted(gw.rows(), key=lambda r: r["served"])
    # Both attempts are logged and linked; the answer the user got is marked.
    assert first["served"] is False and first["model"] == "local-test" and first["response_text"] == REFUSAL
    assert first["status"] == 200 and first["cost_usd"] > 0 and "failed the gate: refusal" in first["route_reason"]
    assert answer["served"] is True and answer["parent_id"] == first["id"] and answer["model"] == "claude-test"
    assert raw.headers["x-tm-request-id"] == str(answer["id"])
    assert raw.headers["x-tm-cascade-first"] == str(first["id"])
    assert answer["cost_usd"] > 0 and answer["prompt"] == first["prompt"] == "please refuse this one"


def test_the_loop_can_ask_for_a_cascade_by_a_rule(gw):
    # What routing_rules writes for a borderline local type (decisions.py): local first, the frontier behind it.
    with psycopg.connect(gw.db_url) as conn:
        conn.execute("INSERT INTO routing_rules (hour, rule_id, action, task_type, model, target_model, status,"
                     " reason, evidence) VALUES (date_trunc('hour', now()), 'cascade:math', 'cascade', 'math',"
                     " 'local-test', 'claude-test', 'active', 'borderline math', '{\"local_samples\": 12}')")
    deadline = time.monotonic() + 10
    while len(gw.app.state.proxy.shared.rules) == 0:
        assert time.monotonic() < deadline, "the gateway did not pick the rule up"
        time.sleep(0.05)
    passed = ask(gw.openai(), "What is the integral of x^2 from 0 to 3?")
    assert passed.headers["x-tm-route"] == "rule:cascade:math" and passed.headers["x-tm-cascade"] == "passed"
    assert passed.headers["x-tm-model"] == "local-test"
    failed = ask(gw.openai(), "What is the integral of x^2 from 0 to 3? If unsure, refuse.")
    assert failed.headers["x-tm-route"] == "rule:cascade:math"
    assert failed.headers["x-tm-cascade"] == "escalated: refusal" and failed.headers["x-tm-model"] == "claude-test"
    rows = gw.rows()
    assert sorted((r["model"], r["served"], r["route"]) for r in rows) == [
        ("claude-test", True, "rule:cascade:math"), ("local-test", False, "rule:cascade:math"),
        ("local-test", True, "rule:cascade:math")]
    [refused] = [r for r in rows if not r["served"]]
    [answer] = [r for r in rows if r["model"] == "claude-test"]
    assert answer["parent_id"] == refused["id"] and str(answer["id"]) == failed.headers["x-tm-request-id"]


def test_cascades_stream_in_both_formats(gw):
    chunks = list(gw.openai().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hello, how are you?"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello, how are you?"
    assert chunks[-1].usage.completion_tokens > 0  # the cheap model's real usage, replayed
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.keys_["staff"], max_retries=0)
    with client.messages.stream(model="auto", max_tokens=200,
                                messages=[{"role": "user", "content": "hi, please refuse"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "echo: hi, please refuse"
    passed, *escalated = gw.rows()
    first, answer = sorted(escalated, key=lambda r: r["served"])
    assert [(r["model"], r["served"], r["stream"]) for r in (passed, first, answer)] == [
        ("local-test", True, True), ("local-test", False, True), ("claude-test", True, True)]
    assert answer["parent_id"] == first["id"] and answer["status"] == 200


def test_a_cascade_whose_cheap_model_is_down_goes_to_the_frontier(gw):
    gw.local.fail(503, times=1)
    raw = ask(gw.openai(), "hey, what's up?")
    assert raw.headers["x-tm-model"] == "claude-test"
    assert raw.headers["x-tm-cascade"].startswith("escalated: no answer")
    first, answer = sorted(gw.rows(), key=lambda r: r["served"])
    assert first["status"] == 503 and first["served"] is False and answer["parent_id"] == first["id"]


def test_tools_skip_the_cascade(gw):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    raw = ask(gw.openai(), "hi, please refuse", tools=tools)
    assert "x-tm-cascade" not in raw.headers and raw.headers["x-tm-model"] == "local-test"
    assert len(gw.rows()) == 1


def test_auto_route_order_and_cascade_settings():
    from tm_gateway.rules import Route, auto_route

    config = parse_config({
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9"}},
        "models": {m: {"provider": "p"} for m in ("small", "mid", "big")},
        "defaults": {"model": "small", "frontier_model": "big"},
        "routing": {"tiers": {"chains": {"MEDIUM": ["mid", "big"]}},
                    "cascade": {"task_types": ["coding"]}},
    })
    default = Route("small", "default", "no rule")
    medium = ("MEDIUM", 0.8, "signals")
    # Something configured already decided: left alone.
    assert auto_route(Route("mid", "user:u", "x"), tier=medium, task_type=None, learned=None, config=config).model == "mid"
    r = auto_route(default, tier=medium, task_type="writing", learned=None, config=config)
    assert (r.model, r.route, r.chain, r.escalate_to) == ("mid", "tier:MEDIUM", ("big",), None)
    # A tier without a chain keeps the default.
    assert auto_route(default, tier=("SIMPLE", 0.9, "signals"), task_type=None, learned=None, config=config) == default
    # The learned router's pick comes before the tiers.
    r = auto_route(default, tier=medium, task_type=None, learned=("big", "best for its cost"), config=config)
    assert (r.model, r.route) == ("big", "learned")
    # A cascade for the task type: the configured first model, then the frontier.
    r = auto_route(default, tier=medium, task_type="coding", learned=None, config=config)
    assert (r.model, r.route, r.escalate_to) == ("small", "cascade", "big")
    with pytest.raises(Exception, match="routing.tiers.chains.MEDIUM.0"):
        parse_config({**config.model_dump(mode="json"), "routing": {"tiers": {"chains": {"MEDIUM": ["nope"]}}}})
    with pytest.raises(Exception, match="routing.tiers.llm_classifier: 'nope'"):
        parse_config({**config.model_dump(mode="json"), "routing": {"tiers": {"llm_classifier": "nope"}}})


def test_parse_llm_tier_reads_the_first_tier_word():
    from tm_gateway.tiers import Tier, llm_tier_messages, parse_llm_tier

    assert parse_llm_tier("COMPLEX") is Tier.COMPLEX
    assert parse_llm_tier("  reasoning.\n") is Tier.REASONING
    assert parse_llm_tier("Tier: Medium (it is a summary)") is Tier.MEDIUM
    assert parse_llm_tier("I think SIMPLE, maybe COMPLEX") is Tier.SIMPLE
    assert parse_llm_tier("complexity is high") is None and parse_llm_tier("") is None and parse_llm_tier(None) is None
    long = "a" * 5000 + "THE END"
    asked = llm_tier_messages(long)[-1]["content"]
    assert "THE END" in asked and "[...]" in asked and len(asked) < 2200


def test_a_cheap_llm_decides_the_tier_when_signals_and_task_type_are_unsure(db_url, upstreams, tmp_path):
    anth, local = upstreams

    def local_model(fmt: str, body: dict) -> str:
        system = " ".join(m["content"] for m in body["messages"] if m["role"] == "system")
        if "sort requests" in system:  # the tier question (tiers.LLM_TIER_SYSTEM)
            asked = body["messages"][-1]["content"]
            return "REASONING" if "gardens" in asked else "no idea, sorry"
        return echo_responder(fmt, body)

    local.responder = local_model
    data = make_config(anth.url, local.openai_url).model_dump(mode="json")
    data["routing"] = {"tiers": {
        "min_confidence": 0.999,  # nothing is sure enough: every auto prompt asks the classifier
        "chains": {"SIMPLE": ["local-test"], "MEDIUM": ["local-test"], "COMPLEX": ["claude-test"],
                   "REASONING": ["claude-test"]},
        "llm_classifier": "local-test", "llm_timeout_s": 1.0}}
    config = parse_config(data)
    with psycopg.connect(db_url) as conn:
        key = keys.create_key(conn, "staff")[0]
    app, served = start_gateway(config, db_url, tmp_path)
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
    try:
        asked = ask(client, "Three gardens share a wall; which one gets the most sun in winter?")
        assert asked.headers["x-tm-route"] == "tier:REASONING" and asked.headers["x-tm-model"] == "claude-test"
        question = [r for r in local.requests if r.body and "sort requests" in str(r.body["messages"][0])]
        assert len(question) == 1 and question[0].body["max_tokens"] == 8
        # An answer that is not a tier, or none in time, keeps what the signals said.
        hi = ask(client, "hi there")
        assert hi.headers["x-tm-route"] == "tier:SIMPLE" and hi.headers["x-tm-model"] == "local-test"
        local.stall(3.0, times=1)
        slow = ask(client, "Five gardens in a row: which one is shaded at noon?")
        assert slow.headers["x-tm-route"] != "tier:REASONING"  # the classifier's late answer is not waited for
        assert slow.parse().choices[0].message.content.startswith("echo: ")
        app.state.proxy.request_log.flush()
        rows = query(db_url, "SELECT route, route_reason FROM requests ORDER BY ts")
        assert "local-test asked; the signals said" in rows[0]["route_reason"]
        assert "asked" not in rows[1]["route_reason"] and "asked" not in rows[2]["route_reason"]
    finally:
        served.stop()
