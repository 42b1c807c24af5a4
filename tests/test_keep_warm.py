"""Keep-warm: an agent's cached prompt prefix re-sent just before the provider's cache would forget it,
only when its pace says the saving beats the ping; each ping a priced row (route keep_warm); one pinging
gateway per database."""

from __future__ import annotations

import time

import anthropic
import psycopg
import pytest

from tests.conftest import Gateway, make_config, start_gateway
from tests.test_prompt_caching import LONG_SYSTEM, price, sent_bodies
from tm_gateway import keys
from tm_gateway.keepwarm import worth_warming

WARM = {"enabled": True, "ttl_s": 2, "lead_s": 1, "interval_s": 0.2}


@pytest.fixture
def warming(db_url, upstreams, tmp_path):
    started: list[Gateway] = []

    def start(home: str = "a", **keep_warm) -> Gateway:
        anthropic_fake, local = upstreams
        with psycopg.connect(db_url) as conn:
            key, _ = keys.create_key(conn, "alice")
        config = make_config(anthropic_fake.url, local.openai_url, limits={"loop": {"repeats": 0}},
                             cache={"enabled": False, "keep_warm": {**WARM, **keep_warm}})
        app, served = start_gateway(config, db_url, tmp_path / home)
        gw = Gateway(url=served.url, key=key, user="alice", db_url=db_url, app=app, served=served)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.served.stop()


def turn(gw: Gateway, question: str, agent: str = "reviewer") -> None:
    anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0).messages.create(
        model="claude-test", max_tokens=20, system=LONG_SYSTEM, messages=[{"role": "user", "content": question}],
        extra_headers={"x-tm-agent": agent})


def test_a_busy_agents_prefix_is_pinged_before_it_expires_and_each_ping_is_a_priced_row(warming, upstreams):
    gw = warming()
    for q in ("first diff", "second diff", "third diff"):
        turn(gw, q)
    time.sleep(2.6)
    pings = gw.rows("route = 'keep_warm'")
    assert 1 <= len(pings) <= 3
    for row in pings:
        assert row["status"] == 200 and row["endpoint"] == "keep_warm" and row["agent"] == "reviewer"
        assert row["user_id"] == "alice" and row["model"] == "claude-test"
        # It read the cached prefix (renewing it) and paid for that, as any row is priced.
        assert row["cache_read_tokens"] > 500 and row["cost_usd"] > 0
        assert row["cost_usd"] == pytest.approx(price(row))
        assert "expected saving" in row["route_reason"]
    bodies = sent_bodies(upstreams)
    ping = bodies[-1]
    assert ping["max_tokens"] == 1 and ping["system"] == bodies[0]["system"]
    # Counted in spend: the rows' cost includes the pings.
    total = sum(r["cost_usd"] for r in gw.rows())
    assert total == pytest.approx(sum(r["cost_usd"] for r in gw.rows("route IS DISTINCT FROM 'keep_warm'"))
                                  + sum(r["cost_usd"] for r in pings))


def test_a_prefix_used_once_is_not_pinged(warming):
    gw = warming()
    turn(gw, "only once")
    time.sleep(2.4)
    assert not gw.rows("route = 'keep_warm'")


def test_one_gateway_pings_for_the_deployment(warming):
    first, second = warming("one"), warming("two")
    for i in range(2):
        turn(first, f"q{i}")
        turn(second, f"r{i}")
    time.sleep(2.6)
    counts = sorted(gw.app.state.proxy.keep_warm.pings for gw in (first, second))
    assert counts[0] == 0 and counts[1] >= 1


def test_off_by_default(gateway):
    assert gateway.app.state.proxy.keep_warm is None


@pytest.mark.parametrize(("uses", "active_s", "ping"), [
    (1, 60, False),          # used once: no evidence it comes back
    (12, 3600, True),        # every five minutes for an hour
    (3, 20 * 3600, False),   # three times in twenty hours
    (2, 600, True),          # twice in ten minutes
])
def test_worth_warming_weighs_the_expected_saving_against_the_ping(uses, active_s, ping):
    ok, saving, cost = worth_warming(uses, active_s, 300, 10_000, 3.0, 3.75, 0.3)
    assert ok is ping
    assert cost == pytest.approx(0.3 * 10_000 / 1e6)
    assert (saving > cost) is ping


def test_worth_warming_uses_anthropics_multipliers_when_the_catalog_has_none():
    _, _, cost = worth_warming(5, 600, 300, 1_000_000, 3.0, None, None)
    assert cost == pytest.approx(0.3)
