"""Consensus plans served by the real gateway: two cheap models answer in parallel; when both pass the
gate and agree, the first one's answer goes out, otherwise the escalation model answers. Every attempt
keeps its row, chained by parent_id to the client's row, and the request's cost counts them all."""

from __future__ import annotations

import time

import anthropic
import openai
import psycopg
import pytest

from tests.conftest import LOCAL_PRICE, make_config, query, start_gateway
from tests.fakes import echo_responder
from tm_gateway import keys
from tm_resources.config import parse_config

QUESTION = 'Which is heavier?\nA) a feather\nB) a brick\nPrint only a single choice from "A" or "B".'


def by_model(answers: dict[str, str]):
    """A local server hosting several models: each upstream model answers its own way."""
    def respond(fmt: str, body: dict) -> str:
        text = echo_responder(fmt, body)
        if "disagree" in text and body["model"] == "tiny-b":
            return "A"
        return answers.get(body["model"], text)
    return respond


@pytest.fixture
def gw(db_url, upstreams, tmp_path):
    anth, local = upstreams
    local.responder = by_model({"tiny-local": "B", "tiny-b": "B) a brick"})
    data = make_config(anth.url, local.openai_url).model_dump(mode="json")
    data["models"]["local-b"] = {"provider": "local", "upstream": "tiny-b", "tier": "local",
                                 "context_window": 8192, "price": LOCAL_PRICE}
    data["routing"] = {"tiers": {"chains": {"SIMPLE": ["local-test"], "MEDIUM": ["local-test"],
                                            "COMPLEX": ["claude-test"], "REASONING": ["claude-test"]}},
                       "cascade": {"tiers": ["SIMPLE", "MEDIUM"], "consensus": ["local-b"]}}
    config = parse_config(data)
    with psycopg.connect(db_url) as conn:
        key = keys.create_key(conn, "staff")[0]
    app, served = start_gateway(config, db_url, tmp_path)

    class G:
        def __init__(self):
            self.url, self.key, self.anthropic, self.local, self.app, self.db_url = (
                served.url, key, anth, local, app, db_url)

        def openai(self):
            return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0)

        def anthropic_client(self):
            return anthropic.Anthropic(base_url=self.url, api_key=self.key, max_retries=0)

        def rows(self):
            assert app.state.proxy.request_log.flush()
            return query(db_url, "SELECT * FROM requests ORDER BY ts, id")

    try:
        yield G()
    finally:
        served.stop()


def chain_of(rows: list[dict], last_id: str) -> list[dict]:
    """The rows of one request, from its first attempt to the client's row, following parent_id."""
    by_id = {str(r["id"]): r for r in rows}
    out = [by_id[last_id]]
    while out[-1]["parent_id"] is not None:
        out.append(by_id[str(out[-1]["parent_id"])])
    return out[::-1]


def test_agreeing_cheap_models_answer_and_both_are_paid_for(gw):
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}])
    assert raw.parse().choices[0].message.content == "B"
    h = raw.headers
    assert (h["x-tm-route"], h["x-tm-cascade"], h["x-tm-model"]) == ("cascade", "agreed", "local-test")
    assert h["x-tm-plan"] == "local-test+local-b>claude-test"
    rows = gw.rows()
    partner, answer = chain_of(rows, h["x-tm-request-id"])
    assert len(rows) == 2 and len(gw.anthropic.requests) == 0
    assert sorted(r.body["model"] for r in gw.local.requests) == ["tiny-b", "tiny-local"]
    assert (partner["model"], partner["served"], partner["parent_id"]) == ("local-b", False, None)
    assert partner["response_text"] == "B) a brick" and "agreed with local-test" in partner["route_reason"]
    assert (answer["model"], answer["served"], answer["response_text"]) == ("local-test", True, "B")
    assert "2 models agree" in answer["route_reason"]
    assert partner["cost_usd"] > 0 and answer["cost_usd"] > 0
    assert float(h["x-tm-cost-usd"]) == pytest.approx(partner["cost_usd"] + answer["cost_usd"], abs=1e-8)


def test_disagreeing_cheap_models_escalate_in_the_anthropic_format(gw):
    raw = gw.anthropic_client().messages.with_raw_response.create(
        model="auto", max_tokens=100, messages=[{"role": "user", "content": QUESTION + " (disagree)"}])
    assert raw.parse().content[0].text.startswith("echo: Which is heavier?")
    h = raw.headers
    assert h["x-tm-model"] == "claude-test" and h["x-tm-cascade"] == "escalated: the cheap answers disagree"
    rows = gw.rows()
    first, second, answer = chain_of(rows, h["x-tm-request-id"])
    assert len(rows) == 3 and h["x-tm-cascade-first"] == str(first["id"])
    assert [(r["model"], r["served"], r["response_text"]) for r in (first, second)] == [
        ("local-test", False, "B"), ("local-b", False, "A")]
    assert answer["served"] is True and answer["model"] == "claude-test" and answer["api_format"] == "anthropic"
    assert all("escalated: the cheap answers disagree" in r["route_reason"] for r in (first, second, answer))
    assert float(h["x-tm-cost-usd"]) == pytest.approx(sum(r["cost_usd"] for r in rows), abs=1e-8)


def test_a_cheap_answer_that_fails_the_gate_escalates(gw):
    gw.local.responder = by_model({"tiny-local": "B", "tiny-b": "I'm sorry, but I can't help with that."})
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}])
    assert raw.headers["x-tm-model"] == "claude-test"
    assert raw.headers["x-tm-cascade"] == "escalated: local-b: refusal; constraint: one of A/B asked"
    first, second, answer = chain_of(gw.rows(), raw.headers["x-tm-request-id"])
    assert "failed the gate: refusal" in second["route_reason"] and second["served"] is False
    assert "escalated: local-b: refusal" in first["route_reason"] and first["response_text"] == "B"


def test_when_one_of_the_pair_fails_the_escalation_model_answers_and_the_failure_is_logged(gw):
    gw.local.fail(503, model="tiny-b")
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}])
    assert raw.parse().choices[0].message.content.startswith("echo: Which is heavier?")
    assert raw.headers["x-tm-model"] == "claude-test"
    assert raw.headers["x-tm-cascade"].startswith("escalated: local-b: no answer (upstream_unavailable)")
    first, failed, answer = chain_of(gw.rows(), raw.headers["x-tm-request-id"])
    assert (first["model"], first["status"], first["served"]) == ("local-test", 200, False)
    assert (failed["model"], failed["status"], failed["served"]) == ("local-b", 503, False)
    assert failed["error_class"] == "upstream_unavailable" and not failed["cost_usd"]
    assert (answer["model"], answer["status"]) == ("claude-test", 200)


def test_consensus_streams_in_both_formats(gw):
    chunks = list(gw.openai().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "B"
    assert chunks[-1].usage.completion_tokens > 0
    with gw.anthropic_client().messages.stream(
            model="auto", max_tokens=100, messages=[{"role": "user", "content": QUESTION + " (disagree)"}]) as s:
        final = s.get_final_message()
    assert final.content[0].text.startswith("echo: Which is heavier?")
    rows = gw.rows()
    assert sorted((r["model"], r["served"], r["stream"], r["api_format"]) for r in rows) == [
        ("claude-test", True, True, "anthropic"),
        ("local-b", False, True, "anthropic"), ("local-b", False, True, "openai"),
        ("local-test", False, True, "anthropic"), ("local-test", True, True, "openai")]
    # The cheap models were asked for whole answers (the gate reads them); only the escalation streamed.
    assert not any(r.body.get("stream") for r in gw.local.requests)
    assert all(r.body.get("stream") for r in gw.anthropic.requests)


def test_a_loop_cascade_rule_runs_as_a_consensus_too(gw):
    with psycopg.connect(gw.db_url) as conn:
        conn.execute("INSERT INTO routing_rules (hour, rule_id, action, task_type, model, target_model, status,"
                     " reason, evidence) VALUES (date_trunc('hour', now()), 'cascade:math', 'cascade', 'math',"
                     " 'local-test', 'claude-test', 'active', 'borderline math', '{\"local_samples\": 12}')")
    deadline = time.monotonic() + 10
    while len(gw.app.state.proxy.shared.rules) == 0:
        assert time.monotonic() < deadline, "the gateway did not pick the rule up"
        time.sleep(0.05)
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is the integral of x^2 from 0 to 3? (disagree)"}])
    assert raw.headers["x-tm-route"] == "rule:cascade:math"
    assert raw.headers["x-tm-plan"] == "local-test+local-b>claude-test" and raw.headers["x-tm-model"] == "claude-test"
    assert len(chain_of(gw.rows(), raw.headers["x-tm-request-id"])) == 3


def test_a_partner_that_falls_back_to_the_first_model_does_not_agree_with_it(db_url, upstreams, tmp_path):
    anth, local = upstreams
    local.responder = by_model({"tiny-local": "B", "tiny-b": "B"})
    data = make_config(anth.url, local.openai_url).model_dump(mode="json")
    data["models"]["local-b"] = {"provider": "local", "upstream": "tiny-b", "tier": "local", "context_window": 8192,
                                 "price": LOCAL_PRICE, "fallbacks": ["local-test"]}
    data["routing"] = {"cascade": {"task_types": [], "tiers": ["SIMPLE", "MEDIUM", "COMPLEX", "REASONING"],
                                   "consensus": ["local-b"]}}
    with psycopg.connect(db_url) as conn:
        key = keys.create_key(conn, "staff")[0]
    app, served = start_gateway(parse_config(data), db_url, tmp_path)
    try:
        local.fail(503, model="tiny-b")
        raw = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0).chat.completions \
            .with_raw_response.create(model="auto", messages=[{"role": "user", "content": QUESTION}])
        assert raw.headers["x-tm-model"] == "claude-test"
        assert raw.headers["x-tm-cascade"] == "escalated: local-b: fell back to local-test, which answered already"
        app.state.proxy.request_log.flush()
        first, partner, answer = chain_of(query(db_url, "SELECT * FROM requests"), raw.headers["x-tm-request-id"])
        assert (first["model"], partner["model"], answer["model"]) == ("local-test", "local-test", "claude-test")
    finally:
        served.stop()
