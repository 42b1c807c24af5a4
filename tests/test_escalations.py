"""What the loop counts as an escalation, on rows the real gateway wrote: a plain cascade that passed, one
that escalated, a consensus that agreed and one that disagreed. Only the two that escalated count, in the
patterns (escalations, escalated_away) and in the grades (escalations, wrong_model_rate); an agreed
consensus, whose partner's row is chained to the client's row, counted as one before."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import openai
import pandas as pd
import psycopg
import pytest

from tests.conftest import LOCAL_PRICE, make_config, query, start_gateway
from tests.fakes import echo_responder
from tm_assets import compute
from tm_gateway import keys
from tm_resources.config import parse_config
from tm_resources.grading import grades, patterns
from tm_resources.quality import reprompt_signal

QUESTION = 'Which is heavier?\nA) a feather\nB) a brick\nPrint only a single choice from "A" or "B".'


def respond(fmt: str, body: dict) -> str:
    """The local server: tiny-local answers B (refuses when asked to), tiny-b agrees unless told not to."""
    text = echo_responder(fmt, body)
    if body["model"] == "tiny-local":
        return "I'm sorry, but I can't help with that." if "(refuse)" in text else "B"
    if body["model"] == "tiny-b":
        return "A" if "(disagree)" in text else "B) a brick"
    return text


def config(anthropic_url: str, openai_url: str, consensus: bool):
    data = make_config(anthropic_url, openai_url).model_dump(mode="json")
    data["models"]["local-b"] = {"provider": "local", "upstream": "tiny-b", "tier": "local",
                                 "context_window": 8192, "price": LOCAL_PRICE}
    data["routing"] = {"tiers": {"chains": {"SIMPLE": ["local-test"], "MEDIUM": ["local-test"],
                                            "COMPLEX": ["claude-test"], "REASONING": ["claude-test"]}},
                       "cascade": {"tiers": ["SIMPLE", "MEDIUM"], "consensus": ["local-b"] if consensus else []}}
    return parse_config(data)


def chain(rows: dict[str, dict], last_id: str) -> list[dict]:
    """One request's rows, first attempt to the client's row, following parent_id."""
    out = [rows[last_id]]
    while out[-1]["parent_id"] is not None:
        out.append(rows[str(out[-1]["parent_id"])])
    return out[::-1]


@pytest.fixture
def four_requests(db_url, upstreams, tmp_path):
    """The four outcomes, asked by one user through a plain-cascade gateway and a consensus gateway:
    {outcome: the request's rows, first attempt to the client's row}."""
    anth, local = upstreams
    local.responder = respond
    with psycopg.connect(db_url) as conn:
        key = keys.create_key(conn, "staff")[0]
    ids = {}
    for consensus, asks in ((False, {"passed": QUESTION, "escalated": QUESTION + " (refuse)"}),
                            (True, {"agreed": QUESTION, "disagreed": QUESTION + " (disagree)"})):
        home = tmp_path / ("consensus" if consensus else "plain")
        app, served = start_gateway(config(anth.url, local.openai_url, consensus), db_url, home)
        try:
            client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
            for outcome, prompt in asks.items():
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": prompt}])
                assert raw.headers["x-tm-cascade"].startswith(outcome if outcome in ("passed", "agreed")
                                                              else "escalated")
                ids[outcome] = raw.headers["x-tm-request-id"]
            assert app.state.proxy.request_log.flush()
        finally:
            served.stop()
    rows = {str(r["id"]): r for r in query(db_url, "SELECT * FROM requests")}
    assert len(rows) == 1 + 2 + 2 + 3
    return {outcome: chain(rows, rid) for outcome, rid in ids.items()}


# Quality per (outcome, position in the chain): the cheap attempt of the escalated cascade was good (the
# escalation was the wrong model), the disagreeing consensus's first answer was poor (rightly escalated).
QUALITY = {"passed": [0.7], "escalated": [0.9, 0.95], "agreed": [0.9, 0.9], "disagreed": [0.3, 0.9, 0.95]}


def score(db_url: str, requests: dict[str, list[dict]]) -> None:
    """What the scoring and typing assets would have written for these rows, with chosen qualities."""
    with psycopg.connect(db_url) as conn:
        for outcome, rows in requests.items():
            for r, q in zip(rows, QUALITY[outcome], strict=True):
                hour = r["ts"].replace(minute=0, second=0, microsecond=0)
                conn.execute("INSERT INTO scored_requests (hour, request_id, ts, user_id, model, quality)"
                             " VALUES (%s, %s, %s, %s, %s, %s)", (hour, r["id"], r["ts"], r["user_id"], r["model"], q))
                conn.execute("INSERT INTO task_types (hour, request_id, ts, user_id, model, task_type, confidence)"
                             " VALUES (%s, %s, %s, %s, %s, 'qa', 1.0)", (hour, r["id"], r["ts"], r["user_id"], r["model"]))


def test_only_the_requests_that_escalated_count_in_patterns_and_grades(db_url, four_requests):
    req = four_requests
    assert [r["model"] for r in req["agreed"]] == ["local-b", "local-test"]        # the partner, then the answer
    assert [r["model"] for r in req["disagreed"]] == ["local-test", "local-b", "claude-test"]
    assert [r["served"] for r in req["agreed"]] == [False, True]
    score(db_url, req)
    latest = max(r["ts"] for rows in req.values() for r in rows)
    hour = latest.replace(minute=0, second=0, microsecond=0)
    cfg = make_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    with psycopg.connect(db_url) as conn:
        window = compute.read_window(conn, hour, hours=24)
    assert len(window) == 8

    pats = compute.patterns_table(window, cfg)
    by_model = pats[pats["scope"] == "type_model"].set_index("model")
    # The frontier answered the two escalations; the agreed consensus's answer is local-test's, no escalation.
    assert by_model.loc["claude-test", "escalations"] == 2
    assert by_model.loc["local-test", "escalations"] == 0 and by_model.loc["local-b", "escalations"] == 0
    # Replaced by an escalation: the refused cascade attempt and the disagreeing pair, not the agreeing partner.
    assert by_model.loc["local-test", "escalated_away"] == 2 and by_model.loc["local-b", "escalated_away"] == 1
    assert by_model["requests"].to_dict() == {"claude-test": 2, "local-b": 2, "local-test": 4}

    g = compute.grades_table(window, hour, cfg).iloc[0]
    assert g["escalations"] == 2
    # Of the two escalations, the cascade's cheap answer (0.9) would have done; the consensus's first (0.3) not.
    assert g["wrong_model_rate"] == pytest.approx(0.5)
    # Four answers received; the unserved attempts are none.
    assert g["samples"] == 4 and g["avg_quality_score"] == pytest.approx(np.mean([0.7, 0.95, 0.9, 0.95]))
    # Four requests today, graded at the last one (the 23:00 hour's grades are taken at midnight: a new day).
    assert grades(window, pd.Timestamp(latest)).iloc[0]["requests_today"] == 4


def test_a_request_a_rule_sent_to_the_frontier_is_no_escalation():
    now = pd.Timestamp("2026-11-20 12:00", tz="UTC")
    row = {"id": "r1", "ts": now - timedelta(minutes=5), "user_id": "ann", "model": "claude-test",
           "task_type": "coding", "quality": 0.9, "cost_usd": 0.01, "prompt": "Write a parser.", "parent_id": None,
           "served": True, "route": "rule:escalate:coding", "route_reason": "coding: local models average 0.41, under the bar of 0.50; route coding to claude-test"}
    df = pd.DataFrame([row])
    assert patterns(df)[1].iloc[0]["escalations"] == 0
    g = grades(df, now).iloc[0]
    # No cheaper answer was refused: nothing to call the wrong model, and the request is the user's.
    assert g["escalations"] == 0 and np.isnan(g["wrong_model_rate"]) and g["requests_today"] == 1


def test_an_escalated_request_is_the_users_follow_up():
    t0 = pd.Timestamp("2026-11-20 12:00", tz="UTC")
    base = {"user_id": "ann", "session_id": "s1"}
    df = pd.DataFrame([
        {**base, "id": "a", "ts": t0, "prompt": "Write a retry decorator.", "parent_id": None, "served": True},
        # The user's correction, cascaded and escalated: the refused attempt, then the answer the user got.
        {**base, "id": "b1", "ts": t0 + timedelta(seconds=60), "prompt": "No, that's wrong, I meant async.",
         "parent_id": None, "served": False},
        {**base, "id": "b2", "ts": t0 + timedelta(seconds=60), "prompt": "No, that's wrong, I meant async.",
         "parent_id": "b1", "served": True},
    ])
    sig = reprompt_signal(df, reprompt_window_s=600)
    assert sig.iloc[0] == 0.0
    assert np.isnan(sig.iloc[1]) and sig.iloc[2] == 1.0
