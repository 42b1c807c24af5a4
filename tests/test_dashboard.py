"""The dashboard over HTTP, served by the real gateway on a seeded database: sign-in, the session cookie, who
sees what (a customer never another user's or team's data, whatever the URL), and what each page says."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tests.dashboard_data import TEAM, loop_tables, request_rows
from tests.support import log_traffic
from tests.traffic import past_hour
from tm_assets.rollups import replace_team_usage_hour, replace_usage_hour
from tm_gateway import keys

HOURS = 6
DAGSTER = "http://dagster.example:3000"


@dataclass
class Site:
    url: str
    db_url: str
    admin_key: str
    keys: dict[str, str]
    rows: list[dict]
    app: object
    config: object = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def sign_in(self, key: str) -> httpx.Client:
        c = self.client()
        r = c.post("/dashboard/login", data={"key": key})
        assert r.status_code == 303, r.text
        return c


def seed(db_url: str, tmp_path, config, *, fallback_share: float = 0.08) -> list[dict]:
    start = past_hour(HOURS + 1)
    rows = list(request_rows(start, HOURS, 40, fallback_share=fallback_share))
    log_traffic(db_url, tmp_path, rows)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for h in range(HOURS):
            replace_usage_hour(conn, start + timedelta(hours=h), config)
            replace_team_usage_hour(conn, start + timedelta(hours=h))
        loop_tables(conn, start, HOURS)
    return rows


@pytest.fixture
def site(db_url, upstreams, tmp_path, request) -> Iterator[Site]:
    anthropic, local = upstreams
    # parametrize("site", [share], indirect=True): the share of the frontier model's answers that fell back
    share = getattr(request, "param", 0.08)
    config = make_config(anthropic.url, local.openai_url,
                         users={u: {"team": team} for u, (team, _) in TEAM.items()},
                         dashboard={"dagster_url": DAGSTER})
    rows = seed(db_url, tmp_path, config, fallback_share=share)
    with psycopg.connect(db_url) as conn:
        admin, _ = keys.create_key(conn, "root", admin=True)
        user_keys = {u: keys.create_key(conn, u)[0] for u in TEAM}
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        yield Site(served.url, db_url, admin, user_keys, rows, app, config)
    finally:
        served.stop()


def page_data(html: str) -> dict:
    return json.loads(re.search(r'<script id="tm-data" type="application/json">(.*?)</script>', html, re.S).group(1))


def test_sign_in_gives_a_strict_httponly_cookie_without_the_key_and_leaves_a_row(site):
    c = site.client()
    form = c.get("/dashboard/login")
    assert form.status_code == 200 and 'method="post"' in form.text and 'type="password"' in form.text
    r = c.post("/dashboard/login", data={"key": site.admin_key})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/dashboard" in cookie
    assert site.admin_key not in cookie and site.admin_key not in r.headers.get("location", "")
    home = c.get("/dashboard/", follow_redirects=True)
    assert home.status_code == 200 and "Team overview" in home.text
    site.app.state.proxy.request_log.flush()
    signed = query(site.db_url, "SELECT user_id, status, endpoint FROM requests WHERE endpoint LIKE '/dashboard%%'")
    assert signed == [{"user_id": "root", "status": 200, "endpoint": "/dashboard/login"}]


def test_a_bad_key_is_refused_and_the_pages_stay_closed(site):
    c = site.client()
    r = c.post("/dashboard/login", data={"key": "tm-not-a-real-key"})
    assert r.status_code == 401 and "not valid" in r.text and "set-cookie" not in r.headers
    assert c.post("/dashboard/login", data={}).status_code == 401
    for page in ("/dashboard/overview", "/dashboard/me", "/dashboard/decisions"):
        closed = c.get(page)
        assert closed.status_code == 303 and closed.headers["location"].endswith("/dashboard/login")
    # A key in the URL signs nobody in.
    assert c.get(f"/dashboard/overview?key={site.admin_key}").status_code == 303
    # A forged cookie is not a session.
    forged = site.client()
    forged.cookies.set("tm_dashboard", "eyJraWQiOiAia194In0=.forged.sig", path="/dashboard")
    assert forged.get("/dashboard/overview").status_code == 303


def test_the_overview_shows_spend_against_the_baseline(site):
    c = site.sign_in(site.admin_key)
    r = c.get("/dashboard/overview?days=1")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store" and "script-src" not in r.headers["content-security-policy"]
    data = page_data(r.text)
    calls = site.rows
    assert data["totals"]["requests"] == len(calls)
    assert data["totals"]["cost"] == pytest.approx(sum(x["cost_usd"] for x in calls))
    assert data["totals"]["baseline"] == pytest.approx(sum(x["baseline_cost_usd"] for x in calls))
    assert 0 < data["totals"]["saving_pct"] < 100
    assert f"${data['totals']['saving']:,.2f}" in r.text
    assert {m["model"] for m in data["models"]} == {"local-test", "claude-test"}
    assert {a["agent"] for a in data["agents"]} == {a for _, agents in TEAM.values() for a in agents}
    assert len(data["by_hour"]) == HOURS
    assert "rule:escalate:math" in {x["route"] for x in data["routes"]}


@pytest.mark.parametrize("site", [0.3], indirect=True)
def test_fallbacks_past_five_percent_raise_a_visible_alert(site):
    c = site.sign_in(site.admin_key)
    html = c.get("/dashboard/overview").text
    (alert,) = re.findall(r'<p class="alert" role="alert">(.*?)</p>', html, re.S)
    assert "claude-test" in alert and "local-test" not in alert


@pytest.mark.parametrize("site", [0.0], indirect=True)
def test_no_alert_while_fallbacks_stay_low(site):
    c = site.sign_in(site.admin_key)
    assert 'role="alert"' not in c.get("/dashboard/overview").text


def test_a_customer_sees_only_their_own_usage_and_their_team(site):
    c = site.sign_in(site.keys["carol"])
    assert c.get("/dashboard/", follow_redirects=True).url.path == "/dashboard/me"
    for team_page in ("/dashboard/overview", "/dashboard/quality", "/dashboard/decisions", "/dashboard/limits"):
        refused = c.get(team_page)
        assert refused.status_code == 403 and "admin key" in refused.text

    own = c.get("/dashboard/me?days=1&user=alice&scope=user")
    data = page_data(own.text)
    carol = [x for x in site.rows if x["user_id"] == "carol"]
    assert data["totals"]["requests"] == len(carol)
    assert data["totals"]["cost"] == pytest.approx(sum(x["cost_usd"] for x in carol))
    assert {a["agent"] for a in data["agents"]} == {"oncall-bot", "reviewer"}
    for other in ("storyboard", "copywriter", "alice", "bob"):
        assert other not in own.text

    team = c.get("/dashboard/me?days=1&scope=team")
    platform = [x for x in site.rows if x["user_id"] in ("carol", "dave")]
    assert page_data(team.text)["totals"]["requests"] == len(platform)
    assert "storyboard" not in team.text and "copywriter" not in team.text


def test_a_customer_without_a_team_cannot_widen_their_view(site):
    with psycopg.connect(site.db_url) as conn:
        key, _ = keys.create_key(conn, "erin")
    deadline = time.monotonic() + 10
    while site.app.state.proxy.shared.lookup(key) is None:  # the gateway re-reads the keys within 0.1 s
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c = site.sign_in(key)
    for url in ("/dashboard/me", "/dashboard/me?scope=team", "/dashboard/me?scope=team&team=design"):
        data = page_data(c.get(url).text)
        assert data["totals"]["requests"] == 0 and data["agents"] == []


def test_a_revoked_key_is_signed_out(site):
    c = site.sign_in(site.keys["dave"])
    assert c.get("/dashboard/me").status_code == 200
    with psycopg.connect(site.db_url) as conn:
        keys.revoke(conn, "dave")
    assert c.get("/dashboard/me").status_code == 303


def test_the_quality_page_grades_everyone_and_shows_the_coaching_brief(site):
    c = site.sign_in(site.admin_key)
    html = c.get("/dashboard/quality").text
    for user in TEAM:
        assert f"<td>{user}</td>" in html
    assert "alice&#39;s prompt quality averaged 0.35" in html  # the brief's reason
    assert "says what is wrong, not what is wanted" in html
    data = page_data(html)
    assert set(data["trend"]) == set(TEAM)
    assert {(q["task_type"], q["model"]) for q in data["quality_heat"]} >= {("math", "local-test")}


def test_the_decisions_page_shows_the_rules_their_history_and_their_run(site):
    c = site.sign_in(site.admin_key)
    html = c.get("/dashboard/decisions").text
    in_force = html.split("<h2>History</h2>")[0]
    assert "escalate:math" in in_force and "lock_local:coding" in in_force
    assert "throttle:dave" not in in_force  # reverted before the newest hour
    history = html.split("<h2>History</h2>")[1]
    assert re.search(r"throttle:dave</code></td><td><span class=\"event event-reverted\">reverted", history)
    assert re.search(r"lock_local:coding</code></td><td><span class=\"event event-applied\">applied", history)
    assert f'href="{DAGSTER}/runs/0f3c2a9e-1111-4a4a-9c9c-5e5e5e5e5e5e"' in html


def test_the_chart_library_is_served_from_the_package(site):
    r = site.client().get("/dashboard/static/echarts.min.js")
    assert r.status_code == 200 and len(r.content) > 500_000 and b"echarts" in r.content[:5000]


def test_budget_and_pool_gauges_show_what_each_used_and_only_your_own_to_a_customer(site):
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from tm_gateway import budgets

    now = datetime.now(UTC)
    with psycopg.connect(site.db_url) as conn:
        budgets.set_limit(conn, "user", "alice", "day", 10.0)
        budgets.set_limit(conn, "user", "carol", "day", 4.0)
        budgets.set_limit(conn, "team", "platform", "month", 100.0)
        budgets.set_limit(conn, "pool", "design", "month", 1_000_000)
        for subject, period, used in (("user:alice:day", "day", 5.0), ("user:carol:day", "day", 1.0),
                                      ("pool:design", "month", 1_500_000)):
            start = budgets.period_bounds(period, now, ZoneInfo("UTC"))[0]
            conn.execute("INSERT INTO budget_usage (subject, period_start, used, cost_usd) VALUES (%s, %s, %s, %s)",
                         (subject, start, used, used if period == "day" else 0))
        conn.execute("INSERT INTO provider_quotas (hour, provider, source, quota_type, used, quota_limit, used_fraction,"
                     " rate_per_h, state, summary) VALUES (date_trunc('hour', now()), 'anthropic', 'self-tracked',"
                     " 'tokens', 960000, 1000000, 0.96, 50000, 'critical',"
                     " 'anthropic: 96% used, at this rate exhausted in 0.8 h')")
        conn.commit()

    page = site.sign_in(site.admin_key).get("/dashboard/limits")
    assert 'class="state-critical"' in page.text and "exhausted in 0.8 h" in page.text
    assert page.status_code == 200
    fractions = dict(re.findall(r'<td>(?:user|team|pool)</td><td>(\w+)</td>.*?data-fraction="([0-9.]*)"', page.text,
                                re.S))
    assert fractions == {"alice": "0.5000", "carol": "0.2500", "platform": "0.0000", "design": "1.5000"}
    assert "overage" in page.text and "$5.00 of $10.00" in page.text and "1,500,000 of 1,000,000" in page.text

    mine = site.sign_in(site.keys["carol"]).get("/dashboard/me")
    assert "$1.00 of $4.00" in mine.text and "platform" in mine.text
    assert "alice" not in mine.text and "1,500,000" not in mine.text and "$5.00 of $10.00" not in mine.text


def test_a_customer_sees_what_they_were_billed_by_billing(site):
    with psycopg.connect(site.db_url, autocommit=True) as conn:
        conn.execute("UPDATE requests SET billing = 'overage', billed_usd = cost_usd * 1.25 WHERE user_id = 'carol'")
        conn.execute("UPDATE requests SET billing = 'included', billed_usd = 0 WHERE user_id = 'dave'")
        hours = [h for (h,) in conn.execute("SELECT DISTINCT date_trunc('hour', ts) FROM requests")]
        for hour in hours:
            replace_usage_hour(conn, hour, site.config)
    carol = [x for x in site.rows if x["user_id"] == "carol"]
    dave = [x for x in site.rows if x["user_id"] == "dave"]
    overage = sum(x["cost_usd"] for x in carol) * 1.25
    page = site.sign_in(site.keys["carol"]).get("/dashboard/me?days=1")
    row = re.search(r"<tr><td>overage</td><td class=\"n\">\$([0-9,.]+)</td>", page.text)
    assert row and float(row.group(1).replace(",", "")) == pytest.approx(overage, abs=0.005)
    team = site.sign_in(site.keys["carol"]).get("/dashboard/me?days=1&scope=team")
    included = re.search(r"drawn from the team's pool \(\$([0-9,.]+) at cost\)", team.text)
    assert included and float(included.group(1).replace(",", "")) == pytest.approx(
        sum(x["cost_usd"] for x in dave), abs=0.005)
