"""`tm savings` on a seeded database: cost, the all-frontier baseline, the saving and quality, hand-computed,
overall and per user, agent, model and task type, as a table and as JSON; bad --since and --by refused."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import yaml

from tests.conftest import make_config
from tm_gateway.cli import main
from tm_resources.savings import parse_since, savings

# Prices (tests/conftest.py): claude-test, the frontier, $3 in / $15 out / $0.3 cache read per million
# tokens; local-test $0.1 in / $0.2 out.
NOW = datetime.now(UTC)


def _seed(url: str) -> None:
    def row(user, model, provider, *, agent=None, i=0, o=0, cr=0, cost=0.0, baseline=None, status=200,
            served=True, task_type=None, typed=None, quality=None, ago=timedelta(hours=2), cache_hit=None):
        rid = uuid.uuid4()
        ts = NOW - ago
        conn.execute(
            "INSERT INTO requests (id, ts, user_id, api_format, endpoint, agent, model, provider, input_tokens,"
            " output_tokens, cache_read_tokens, cost_usd, baseline_cost_usd, status, served, task_type, cache_hit)"
            " VALUES (%s, %s, %s, 'openai', '/v1/chat/completions', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (rid, ts, user, agent, model, provider, i, o, cr, cost, baseline, status, served, task_type, cache_hit))
        if quality is not None:
            conn.execute("INSERT INTO scored_requests (hour, request_id, ts, user_id, model, quality)"
                         " VALUES (date_trunc('hour', %s::timestamptz), %s, %s, %s, %s, %s)",
                         (ts, rid, ts, user, model, quality))
        if typed is not None:
            conn.execute("INSERT INTO task_types (hour, request_id, ts, user_id, model, task_type, confidence)"
                         " VALUES (date_trunc('hour', %s::timestamptz), %s, %s, %s, %s, %s, 0.9)",
                         (ts, rid, ts, user, model, typed))

    with psycopg.connect(url) as conn:
        # 1. local answer: $0.0002; on the frontier it would have been $0.0105
        row("alice", "local-test", "local", agent="coder", i=1000, o=500, cost=0.0002, baseline=0.0105,
            typed="coding", quality=0.8)
        # 2. frontier answer: its own baseline
        row("alice", "claude-test", "anthropic", i=2000, o=1000, cr=1000, cost=0.0213, baseline=0.0213,
            task_type="writing", quality=0.9)
        # 3. a cache hit: free, the frontier would have charged its source's $0.0105
        row("bob", "local-test", "cache", agent="coder", cost=0.0, baseline=0.0105, typed="coding", quality=0.7,
            cache_hit="exact")
        # 4. a cascade's first answer, not served: paid for, no baseline (the frontier world never made it)
        row("bob", "local-test", "local", i=1000, o=500, cost=0.0002, baseline=0.0105, served=False, quality=0.3)
        # 5. its escalation, from an older version without a baseline: priced here at $0.0105
        row("bob", "claude-test", "anthropic", i=1000, o=500, cost=0.0105)
        # 6. a provider error: nothing paid, nothing to compare
        row("carol", "local-test", "local", status=502)
        # 7. ten days ago: outside --since 7d
        row("alice", "claude-test", "anthropic", i=10_000, o=10_000, cost=1.0, baseline=1.0, ago=timedelta(days=10))


@pytest.fixture
def seeded(db_url):
    _seed(db_url)
    return db_url


def _config():
    return make_config("http://127.0.0.1:9", "http://127.0.0.1:9/v1")


def test_the_figures_are_right(seeded):
    with psycopg.connect(seeded) as conn:
        total, groups = savings(conn, _config(), NOW - timedelta(days=7), NOW)
    assert groups == []
    assert total.requests == 5
    assert total.cost_usd == pytest.approx(0.0322)
    assert total.baseline_usd == pytest.approx(0.0528)
    assert total.saving_usd == pytest.approx(0.0206)
    assert total.saving_pct == pytest.approx(39.02, abs=0.01)
    assert total.avg_quality == pytest.approx(0.8)  # 0.8, 0.9, 0.7: the unserved 0.3 is not what anyone got
    assert total.scored == 3


@pytest.mark.parametrize(("by", "expected"), [
    ("user", {"alice": (2, 0.0215, 0.0318, 0.85), "bob": (2, 0.0107, 0.0210, 0.7), "carol": (1, 0.0, 0.0, None)}),
    ("agent", {"coder": (2, 0.0002, 0.0210, 0.75), "(no agent)": (3, 0.0320, 0.0318, 0.9)}),
    ("model", {"local-test": (3, 0.0004, 0.0210, 0.75), "claude-test": (2, 0.0318, 0.0318, 0.9)}),
    ("type", {"coding": (2, 0.0002, 0.0210, 0.75), "writing": (1, 0.0213, 0.0213, 0.9),
              "(untyped)": (2, 0.0107, 0.0105, None)}),
])
def test_groupings(seeded, by, expected):
    with psycopg.connect(seeded) as conn:
        total, groups = savings(conn, _config(), NOW - timedelta(days=7), NOW, by)
    got = {g.group: (g.requests, g.cost_usd, g.baseline_usd, g.avg_quality) for g in groups}
    assert set(got) == set(expected)
    for name, (n, cost, baseline, q) in expected.items():
        assert got[name][0] == n, name
        assert got[name][1] == pytest.approx(cost), name
        assert got[name][2] == pytest.approx(baseline), name
        assert got[name][3] == (pytest.approx(q) if q is not None else None), name
    assert total.cost_usd == pytest.approx(sum(g.cost_usd for g in groups))
    assert total.baseline_usd == pytest.approx(sum(g.baseline_usd for g in groups))


def test_without_a_frontier_model_a_row_without_baseline_claims_no_saving(seeded):
    config = _config().model_copy(update={"defaults": _config().defaults.model_copy(update={"frontier_model": None})})
    with psycopg.connect(seeded) as conn:
        _, groups = savings(conn, config, NOW - timedelta(days=7), NOW, "user")
    bob = next(g for g in groups if g.group == "bob")
    assert bob.baseline_usd == pytest.approx(0.0105 + 0.0105)  # the cache hit's record, and row 5 at its own cost


def test_tm_savings_json_and_table(seeded, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "tm.yaml"
    cfg.write_text(yaml.safe_dump(_config().model_dump(mode="json")))
    monkeypatch.setenv("TM_DATABASE_URL", seeded)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))

    assert main(["savings", "--config", str(cfg), "--json", "--by", "user"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frontier_model"] == "claude-test" and out["by"] == "user"
    assert out["total"]["saving_usd"] == pytest.approx(0.0206)
    assert {g["group"]: g["requests"] for g in out["groups"]} == {"alice": 2, "bob": 2, "carol": 1}

    assert main(["savings", "--config", str(cfg), "--since", "30d", "--json"]) == 0
    month = json.loads(capsys.readouterr().out)
    assert month["total"]["requests"] == 6 and month["total"]["cost_usd"] == pytest.approx(1.0322)

    assert main(["savings", "--config", str(cfg), "--by", "model"]) == 0
    text = capsys.readouterr().out
    assert "against every request on claude-test" in text
    lines = text.splitlines()
    assert any(line.startswith("local-test") and "0.0004" in line and "0.0210" in line for line in lines)
    assert any(line.startswith("total") and "0.0322" in line and "0.0528" in line for line in lines)


@pytest.mark.parametrize("since", ["7", "seven days", "-3d", "0h", "3y"])
def test_a_bad_since_is_refused_clearly(since, capsys):
    assert main(["savings", f"--since={since}"]) == 2
    err = capsys.readouterr().err
    assert f"--since {since!r}" in err and "7d" in err
    with pytest.raises(ValueError):
        parse_since(since)


def test_a_bad_grouping_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["savings", "--by", "team"])
    assert exc.value.code == 2
    assert "invalid choice: 'team'" in capsys.readouterr().err


def test_parse_since_units():
    assert parse_since("90m") == timedelta(minutes=90)
    assert parse_since("24h") == timedelta(hours=24)
    assert parse_since("7d") == timedelta(days=7)
    assert parse_since("2w") == timedelta(weeks=2)
