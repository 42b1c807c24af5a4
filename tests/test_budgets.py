"""Budgets, teams, token pools and billing, enforced by the gateway: the official SDKs against real
Postgres, one gateway or two on the same database, and `tm budgets` as a user runs it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import psycopg
import pytest

from tests.conftest import CLAUDE_PRICE, ServedApp, make_config, query, start_gateway
from tests.fakes import FakePostHog
from tm_gateway import keys
from tm_gateway.cli import main

pytestmark = pytest.mark.slow  # about a minute (35 gateways started): out of the fast tier

FREE = {"provider": "local", "upstream": "tiny-free", "tier": "local", "price": {"input": 0, "output": 0}}
PREMIUM = {"provider": "anthropic", "upstream": "claude-big", "tier": "premium", "context_window": 200000,
           "price": {"input": 15.0, "output": 75.0}}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def as_many_words_as_allowed(fmt: str, body: dict) -> str:
    """An answer exactly as long as max_tokens allows (the fakes count a token per word), so each
    request costs what the guard reserves for its answer."""
    return words(body.get("max_tokens") or body.get("max_completion_tokens") or 10)


class Budgeted:
    """Gateways (one or more, on one database) with budgets configured, and the keys of their users."""

    def __init__(self, db_url: str, upstreams, tmp_path: Path, budgets: dict, **config):
        self.db_url = db_url
        self.anthropic, self.local = upstreams
        self.tmp_path = tmp_path
        # No prompt classifier: these tests route by configuration, and loading it takes seconds.
        config.setdefault("gateway", {"classify_auto": False})
        config.setdefault("models", {"free-local": FREE, "claude-premium": PREMIUM})
        self.config = make_config(self.anthropic.url, self.local.openai_url, budgets=budgets,
                                  presets={"tm:basic": ["claude-test", "local-test"]}, **config)
        self.keys: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        self.apps: list[tuple[object, ServedApp]] = []

    def key(self, user: str, team: str | None = None) -> str:
        name = f"{user}@{team}" if team else user
        if name not in self.keys:
            with psycopg.connect(self.db_url) as conn:
                self.keys[name], info = keys.create_key(conn, user, team=team)
            self.key_ids[name] = info.id
            # Running gateways pick a new key up within their refresh interval.
            deadline = time.monotonic() + 5
            while any(app.state.proxy.authenticate(None, {"authorization": f"Bearer {self.keys[name]}"}) is None
                      for app, _ in self.apps) and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.keys[name]

    def start(self, n: int = 1) -> Budgeted:
        for i in range(n):
            self.apps.append(start_gateway(self.config, self.db_url, self.tmp_path / f"gw{len(self.apps)}{i}"))
        return self

    def url(self, i: int = 0) -> str:
        return self.apps[i][1].url

    def openai(self, user: str = "alice", i: int = 0, team: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(i) + "/v1", api_key=self.key(user, team), max_retries=0)

    def anthropic_client(self, user: str = "alice", i: int = 0, team: str | None = None) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url(i), api_key=self.key(user, team), max_retries=0)

    def rows(self, where: str = "true", params: tuple = ()) -> list[dict]:
        for app, _ in self.apps:
            assert app.state.proxy.request_log.flush()
        return query(self.db_url, f"SELECT * FROM requests WHERE {where} ORDER BY ts, id", params)

    def usage(self, subject: str) -> float:
        got = query(self.db_url, "SELECT used FROM budget_usage WHERE subject = %s", (subject,))
        return got[0]["used"] if got else 0.0

    def settled(self, subject: str, want: float, timeout: float = 10) -> float:
        """The counter once the settlements under way have landed (they run after the answer is sent)."""
        deadline = time.monotonic() + timeout
        while True:
            used = self.usage(subject)
            if used == pytest.approx(want, rel=1e-9, abs=1e-12) or time.monotonic() > deadline:
                return used
            time.sleep(0.05)

    def stop(self) -> None:
        for _, served in self.apps:
            served.stop()


@pytest.fixture
def budgeted(db_url, upstreams, tmp_path) -> Iterator:
    made: list[Budgeted] = []

    def make(budgets: dict, n: int = 1, **config) -> Budgeted:
        b = Budgeted(db_url, upstreams, tmp_path, budgets, **config)
        made.append(b)
        return b.start(n)

    yield make
    for b in made:
        b.stop()


# The real cost of one request of MAX_TOKENS output words on claude-test, the input a few words.
MAX_TOKENS = 100
PROMPT = "count to a hundred"
ONE_REQUEST = (4 * CLAUDE_PRICE["input"] + MAX_TOKENS * CLAUDE_PRICE["output"]) / 1e6


def _spend_concurrently(b: Budgeted, n: int, gateways: int) -> list[tuple[int, int]]:
    """(which gateway, the status it answered) for `n` requests at once, spread over the gateways."""
    clients = [openai.AsyncOpenAI(base_url=b.url(i) + "/v1", api_key=b.key("alice"), max_retries=0,
                                  timeout=60) for i in range(gateways)]

    async def one(i: int) -> tuple[int, int]:
        try:
            await clients[i % gateways].chat.completions.create(
                model="claude-test", max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": PROMPT}])
            return i % gateways, 200
        except openai.APIStatusError as err:
            return i % gateways, err.status_code

    async def all_of_them() -> list[tuple[int, int]]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(all_of_them())


@pytest.mark.parametrize("gateways", [1, 2])
def test_concurrent_requests_never_spend_past_the_limit(budgeted, upstreams, gateways):
    upstreams[0].responder = as_many_words_as_allowed
    limit = 50 * ONE_REQUEST
    b = budgeted({"users": {"alice": {"day": limit}}}, n=gateways)
    answers = _spend_concurrently(b, 200, gateways)
    statuses = [status for _, status in answers]
    assert set(statuses) <= {200, 429}
    rows = b.rows()
    assert len(rows) == 200  # one row each, refused or answered
    answered = [r for r in rows if r["status"] == 200]
    spent = sum(r["cost_usd"] for r in answered)
    assert spent <= limit
    assert 30 <= len(answered) <= 50 and statuses.count(200) == len(answered)
    assert {r["error_class"] for r in rows if r["status"] == 429} == {"budget_exceeded"}
    # Every reservation settled to the real cost: the counter is what the rows cost.
    assert b.settled("user:alice:day", spent) == pytest.approx(spent)
    # Both gateways spent from the one budget.
    assert {gw for gw, status in answers if status == 200} == set(range(gateways))


@pytest.mark.parametrize("scope", ["user", "team", "key"])
@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_a_spent_budget_is_a_429_in_the_openai_format(budgeted, scope, period):
    b = budgeted({})
    b.key("alice", "design")
    name = {"user": "alice", "team": "design", "key": b.key_ids["alice@design"]}[scope]
    with psycopg.connect(b.db_url) as conn:
        conn.execute("INSERT INTO budgets (scope, subject, period, amount) VALUES (%s, %s, %s, 0.0001)",
                     (scope, name, period))
    time.sleep(0.5)  # every replica re-reads the budgets within its refresh interval (0.1 s here)
    with pytest.raises(openai.RateLimitError) as caught:
        b.openai(team="design").chat.completions.create(model="claude-test", max_tokens=50,
                                                         messages=[{"role": "user", "content": PROMPT}])
    err = caught.value
    assert err.status_code == 429
    assert err.body["type"] == "insufficient_quota" and err.code == "insufficient_quota"
    message = err.body["message"]
    word = {"day": "daily", "week": "weekly", "month": "monthly"}[period]
    assert f"{scope} {name}'s {word} budget of $0.00 is spent" in message
    assert "$0.00 used" in message and "resets at" in message and "claude-test" in message
    assert err.response.headers["x-should-retry"] == "false"
    [row] = b.rows()
    assert (row["status"], row["error_class"], row["team"]) == (429, "budget_exceeded", "design")
    assert b.anthropic.requests == []  # refused before any provider was called


@pytest.mark.parametrize("scope", ["user", "team", "key"])
def test_a_spent_budget_is_a_rate_limit_error_in_the_anthropic_format(budgeted, scope):
    b = budgeted({}, users={"alice": {"team": "design"}})  # the team from tm.yaml, this time
    name = {"user": "alice", "team": "design", "key": None}[scope]
    b.key("alice")
    name = name or b.key_ids["alice"]
    with psycopg.connect(b.db_url) as conn:
        conn.execute("INSERT INTO budgets (scope, subject, period, amount) VALUES (%s, %s, 'month', 0)",
                     (scope, name))
    time.sleep(0.5)
    with pytest.raises(anthropic.RateLimitError) as caught:
        b.anthropic_client().messages.create(model="claude-test", max_tokens=50,
                                             messages=[{"role": "user", "content": PROMPT}])
    assert caught.value.status_code == 429
    assert caught.value.response.headers["x-should-retry"] == "false"
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert f"{scope} {name}'s monthly budget of $0.00 is spent" in body["error"]["message"]
    [row] = b.rows()
    assert (row["status"], row["error_class"], row["team"]) == (429, "budget_exceeded", "design")


def test_auto_and_presets_go_to_a_free_local_model_when_the_budget_is_spent(budgeted):
    b = budgeted({"users": {"alice": {"day": 0}}}, defaults={"model": "claude-test"})
    for model in ("auto", "tm:basic"):
        raw = b.openai().chat.completions.with_raw_response.create(
            model=model, max_tokens=20, messages=[{"role": "user", "content": PROMPT}])
        assert raw.parse().choices[0].message.content == "echo: " + PROMPT
        assert raw.headers["x-tm-model"] == "free-local" and raw.headers["x-tm-route"] == "budget:local"
        assert float(raw.headers["x-tm-budget-used"]) >= 1
    rows = b.rows()
    assert [(r["model"], r["status"], r["route"], r["billing"]) for r in rows] == [
        ("free-local", 200, "budget:local", "local")] * 2
    assert "daily budget of $0.00 is spent" in rows[0]["route_reason"]
    assert b.anthropic.requests == []


def test_a_spent_budget_never_blocks_a_free_local_model(budgeted):
    b = budgeted({"user": {"day": 0, "month": 0}})
    for fmt in ("openai", "anthropic"):
        if fmt == "openai":
            text = b.openai().chat.completions.create(
                model="free-local", messages=[{"role": "user", "content": PROMPT}]).choices[0].message.content
        else:
            text = b.anthropic_client().messages.create(
                model="free-local", max_tokens=20, messages=[{"role": "user", "content": PROMPT}]).content[0].text
        assert text == "echo: " + PROMPT
    assert [r["status"] for r in b.rows()] == [200, 200]
    assert b.usage("user:alice:day") == 0.0


def _ask_claude(client: anthropic.Anthropic, n_words: int):
    return client.messages.with_raw_response.create(model="claude-test", max_tokens=n_words,
                                                    messages=[{"role": "user", "content": "go"}])


def test_a_used_up_pool_switches_the_team_to_overage_billing(budgeted, upstreams):
    upstreams[0].responder = as_many_words_as_allowed
    # claude-test is the reference model: its tokens count one standard token each. 1 input + 100
    # output tokens a request: the pool of 250 holds two requests and half of the third.
    b = budgeted({"pools": {"design": 250}, "billing": {"reference_model": "claude-test"}},
                 users={"alice": {"team": "design"}})
    client = b.anthropic_client()
    for _ in range(4):
        _ask_claude(client, 100)
        b.rows()
        b.settled("pool:design", 101 * len(b.rows()))
    rows = b.rows()
    cost = (1 * CLAUDE_PRICE["input"] + 100 * CLAUDE_PRICE["output"]) / 1e6
    assert [r["cost_usd"] for r in rows] == [pytest.approx(cost)] * 4
    assert [r["billing"] for r in rows] == ["included", "included", "overage", "overage"]
    # claude-test's band: ($3 + $15) / 2 = $9 per million, over $1.20: a 20 % markup. The third
    # request's 101 tokens are 48 in the pool and 53 past it.
    assert [r["billed_usd"] for r in rows] == [
        0.0, 0.0, pytest.approx(cost * 53 / 101 * 1.2), pytest.approx(cost * 1.2)]
    assert {r["team"] for r in rows} == {"design"}
    levels = query(b.db_url, "SELECT level, message, data FROM alerts WHERE kind = 'pool' ORDER BY id")
    assert [a["level"] for a in levels] == ["0.5", "0.75", "0.9", "1", "1.5"]
    full = levels[3]
    assert "used all the included tokens" in full["message"]
    assert "Requests continue, billed at overage rates" in full["message"]
    assert "this month's overage comes to about $" in full["message"]
    assert full["data"]["estimated_overage_usd"] > 0


def test_premium_models_are_billed_outside_the_pool(budgeted, upstreams):
    upstreams[0].responder = as_many_words_as_allowed
    b = budgeted({"pools": {"design": 1_000_000}}, users={"alice": {"team": "design", "premium": True}})
    b.anthropic_client().messages.create(model="claude-premium", max_tokens=10,
                                         messages=[{"role": "user", "content": "go"}])
    [row] = b.rows()
    cost = (1 * 15.0 + 10 * 75.0) / 1e6
    # ($15 + $75) / 2 = $45 per million: over the first premium band ($20), 8 %.
    assert (row["billing"], row["billed_usd"]) == ("premium", pytest.approx(cost * 1.08))
    assert b.settled("pool:design", 0.0) == 0.0


def test_budget_alerts_fire_once_per_threshold_and_the_header_follows(budgeted, upstreams, monkeypatch):
    upstreams[0].responder = as_many_words_as_allowed
    cost = (1 * CLAUDE_PRICE["input"] + 100 * CLAUDE_PRICE["output"]) / 1e6
    # Room for ten requests and what the eleventh would reserve past them is not there.
    limit = 10 * cost + 1e-4
    with FakePostHog() as ph:
        monkeypatch.setenv("POSTHOG_API_KEY", "phc_test")
        monkeypatch.setenv("POSTHOG_HOST", ph.url)
        b = budgeted({"users": {"alice": {"week": limit}}})
        client = b.anthropic_client()
        seen = []
        for i in range(10):
            raw = _ask_claude(client, 100)
            seen.append(raw.headers.get("x-tm-budget-used"))
            b.rows()
            b.settled("user:alice:week", cost * (i + 1))
        with pytest.raises(anthropic.RateLimitError):
            _ask_claude(client, 100)
        deadline = time.monotonic() + 5
        while len(query(b.db_url, "SELECT 1 FROM alerts")) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        for app, _ in b.apps:
            app.state.proxy.events.close()
        events = ph.wait_for(4)
    # From the request that finds half the budget used, the header says how much was used before it.
    before = [k * cost / limit for k in range(10)]
    assert [s is not None for s in seen] == [f >= 0.5 for f in before]
    assert [float(s) for s in seen if s] == pytest.approx([f for f in before if f >= 0.5], abs=0.006)
    got = query(b.db_url, "SELECT subject, level, message FROM alerts ORDER BY id")
    # 0.5, 0.75 and 0.9 as the spend passes them; 1 when a request finds the budget spent.
    assert [(a["subject"], a["level"]) for a in got] == [("user:alice:week", lv) for lv in ("0.5", "0.75", "0.9", "1")]
    assert "user alice's weekly budget" in got[0]["message"] and "% used" in got[0]["message"]
    assert "is spent" in got[3]["message"]
    assert [e["properties"]["level"] for e in events if e["event"] == "tm_alert"] == ["0.5", "0.75", "0.9", "1"]


def test_streams_and_cut_streams_settle_to_what_they_cost(budgeted, upstreams):
    anth, _ = upstreams
    anth.responder = as_many_words_as_allowed
    b = budgeted({"users": {"alice": {"day": 10.0}}})
    with b.anthropic_client().messages.stream(model="claude-test", max_tokens=30,
                                              messages=[{"role": "user", "content": "go"}]) as s:
        assert len(s.get_final_message().content[0].text.split()) == 30
    [row] = b.rows()
    assert row["status"] == 200 and row["stream"] is True
    assert b.settled("user:alice:day", row["cost_usd"]) == pytest.approx(row["cost_usd"])

    anth.chunk_delay = 0.05
    with httpx.stream("POST", b.url() + "/v1/chat/completions", headers={"authorization": f"Bearer {b.key('alice')}"},
                      json={"model": "claude-test", "max_tokens": 200, "stream": True,
                            "messages": [{"role": "user", "content": "go"}]}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        [next(lines) for _ in range(6)]
    deadline = time.monotonic() + 5
    while len(rows := b.rows()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    cut = rows[1]
    assert cut["status"] == 499
    # The reservation (200 output tokens at $15 per million) is given back; what the row cost stays.
    total = row["cost_usd"] + cut["cost_usd"]
    assert b.settled("user:alice:day", total) == pytest.approx(total)


@pytest.mark.parametrize("consensus", [[], ["local-test-2"]])
def test_a_cascade_counts_every_answer(budgeted, upstreams, consensus):
    anth, local = upstreams
    local.responder = lambda fmt, body: "I'm sorry, but I can't help with that."
    b = budgeted({"users": {"alice": {"day": 10.0}}},
                 routing={"cascade": {"tiers": ["SIMPLE", "MEDIUM", "COMPLEX", "REASONING"], "consensus": consensus}},
                 models={"free-local": FREE, "claude-premium": PREMIUM,
                         "local-test-2": {"provider": "local", "upstream": "tiny-2", "price": {"input": 0.3, "output": 0.6}}})
    b.openai().chat.completions.create(model="auto", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    rows = b.rows()
    # The cheap answers refused by the gate, then the frontier's: each paid for.
    assert len(rows) == 2 + len(consensus) and [r["served"] for r in rows].count(True) == 1
    total = sum(r["cost_usd"] for r in rows)
    assert all(r["cost_usd"] > 0 for r in rows)
    assert b.settled("user:alice:day", total) == pytest.approx(total)


def test_a_cache_hit_costs_nothing_and_gives_its_reservation_back(budgeted):
    b = budgeted({"users": {"alice": {"day": 10.0}}}, cache={"enabled": True, "semantic": {"enabled": False}})
    for _ in range(2):
        b.openai().chat.completions.create(model="claude-test", max_tokens=20,
                                           messages=[{"role": "user", "content": PROMPT}])
        b.rows()
    rows = b.rows()
    assert [r["cache_hit"] for r in rows] == [None, "exact"]
    assert b.settled("user:alice:day", rows[0]["cost_usd"]) == pytest.approx(rows[0]["cost_usd"])


def test_tm_budgets_set_list_clear(budgeted, monkeypatch, capsys, tmp_path):
    b = budgeted({"teams": {"design": {"month": 100.0}}, "pools": {"design": 5_000_000}},
                 users={"alice": {"team": "design"}})
    monkeypatch.setenv("TM_DATABASE_URL", b.db_url)
    assert main(["keys", "create", "--user", "bob", "--team", "design"]) == 0
    assert "API key for user 'bob' of team 'design'" in capsys.readouterr().out
    assert main(["keys", "list"]) == 0
    assert "team design" in capsys.readouterr().out
    config = tmp_path / "tm.yaml"
    config.write_text(json.dumps(b.config.model_dump(mode="json")))  # JSON is YAML
    assert main(["budgets", "set", "user", "alice", "day", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"scope": "user", "subject": "alice", "period": "day", "amount": 0.0}
    # Picked up by the running gateway within its refresh interval.
    time.sleep(0.5)
    with pytest.raises(openai.RateLimitError):
        b.openai().chat.completions.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert main(["budgets", "list", "--json", "--config", str(config)]) == 0
    listed = {(r["scope"], r["subject"], r["period"]): r for r in json.loads(capsys.readouterr().out)}
    assert listed[("user", "alice", "day")]["source"] == "tm budgets set"
    assert listed[("team", "design", "month")]["amount"] == 100.0
    assert listed[("team", "design", "month")]["source"] == "tm.yaml"
    assert listed[("pool", "design", "month")]["amount"] == 5_000_000
    assert "resets_at" in listed[("user", "alice", "day")]
    assert main(["budgets", "list", "--config", str(config)]) == 0
    assert "tm budgets set" in capsys.readouterr().out
    assert main(["budgets", "set", "pool", "design", "day", "5"]) == 2
    assert "a pool is monthly" in capsys.readouterr().err
    assert main(["budgets", "clear", "user", "alice", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"cleared": 1}
    assert main(["budgets", "clear", "user", "alice"]) == 1
    time.sleep(0.5)
    b.openai().chat.completions.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_no_budget_configured_costs_no_query(budgeted):
    b = budgeted({})
    proxy = b.apps[0][0].state.proxy
    b.openai().chat.completions.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert proxy.budgets._pool is None  # never opened: no reservation was made
    [row] = b.rows()
    assert (row["billing"], row["billed_usd"]) == ("included", pytest.approx(row["cost_usd"]))


@pytest.mark.parametrize("period,now,start,end", [
    # Paris leaves summer time on Sunday 25 October 2026: that week is an hour longer, and still
    # starts and ends at local midnight on Mondays.
    ("week", "2026-10-25T12:00:00+01:00", "2026-10-19T00:00:00+02:00", "2026-10-26T00:00:00+01:00"),
    ("day", "2026-11-30T23:30:00+01:00", "2026-11-30T00:00:00+01:00", "2026-12-01T00:00:00+01:00"),
    ("month", "2026-12-31T23:59:00+01:00", "2026-12-01T00:00:00+01:00", "2027-01-01T00:00:00+01:00"),
])
def test_periods_follow_the_configured_calendar(period, now, start, end):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from tm_gateway.budgets import period_bounds

    got = period_bounds(period, datetime.fromisoformat(now), ZoneInfo("Europe/Paris"))
    assert got == (datetime.fromisoformat(start), datetime.fromisoformat(end))


@pytest.mark.parametrize("budgets,error", [
    ({"timezone": "Mars/Olympus"}, "budgets.timezone: 'Mars/Olympus' is not a time zone"),
    ({"billing": {"markup": [{"markup": 0.2}, {"up_to": 1, "markup": 0.3}]}}, "budgets.billing.markup"),
    ({"billing": {"reference_model": "gpt-9"}}, "'gpt-9' is not one of the models"),
    ({"users": {"alice": {"dya": 5}}}, "budgets.users.alice.dya: unknown key"),
    ({"teams": {"design": {"month": -1}}}, "budgets.teams.design.month"),
])
def test_a_bad_budgets_section_is_refused_with_its_key(budgets, error):
    from tm_resources.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", budgets=budgets)
    assert error in str(caught.value)


def test_the_reservation_bounds_what_a_request_can_cost():
    from tm_gateway.budgets import estimate_input_tokens, max_cost

    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1", models={"claude-premium": PREMIUM})
    # The priciest model of the chain sets it; no prompt counts past that model's context window.
    assert max_cost(config, ["local-test", "claude-test"], 1000, 100) == pytest.approx(
        (1000 * CLAUDE_PRICE["input"] + 100 * CLAUDE_PRICE["output"]) / 1e6)
    huge = estimate_input_tokens("x" * 10_000_000)
    assert max_cost(config, ["claude-test"], huge, 0) == pytest.approx(200_000 * CLAUDE_PRICE["input"] / 1e6)


def test_a_reservation_a_dead_gateway_left_is_given_back_once_it_expires(budgeted, monkeypatch):
    import uuid
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from tm_gateway.budgets import period_bounds
    from tm_gateway.stages import guard

    monkeypatch.setattr(guard, "RELEASE_EVERY_S", 0.1)
    b = budgeted({"users": {"alice": {"day": 1.0}}, "reservation_ttl_s": 0.2})
    start = period_bounds("day", datetime.now(UTC), ZoneInfo("UTC"))[0]
    # What a gateway killed in the middle of a request leaves: a reservation that will never settle.
    with psycopg.connect(b.db_url, autocommit=True) as conn:
        conn.execute("SELECT tm_budget_reserve(%s, %s, %s, %s, %s, 0.2)",
                     (uuid.uuid4(), ["user:alice:day"], [start], [0.9], [1.0]))
    with pytest.raises(openai.RateLimitError):  # $0.90 of $1 held: no room for this one
        b.openai().chat.completions.create(model="claude-test", max_tokens=10_000,
                                           messages=[{"role": "user", "content": PROMPT}])
    # Another request opens the replica's connections, and with them its sweep of expired holds.
    b.openai().chat.completions.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    answered = [r for r in b.rows() if r["status"] == 200]
    cost = sum(r["cost_usd"] for r in answered)
    assert b.settled("user:alice:day", cost) == pytest.approx(cost)
    assert query(b.db_url, "SELECT count(*) AS n FROM budget_holds")[0]["n"] == 0
    b.openai().chat.completions.create(model="claude-test", max_tokens=10_000,
                                       messages=[{"role": "user", "content": PROMPT}])
