"""tm analyze, tm optimize and tm rules revert on a real Postgres with seeded scored requests: the cheaper-model
opportunity and its saving, overrides the gateway obeys (through the OpenAI SDK), and their undoing."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import openai
import psycopg
import pytest

from tests.conftest import start_gateway
from tests.ops_support import cost, ops_config, seed, write_ops_config
from tm_gateway import keys
from tm_gateway.cli import main


@pytest.fixture
def env(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TM_USER", "olga")
    return tmp_path


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_analyze_finds_the_cheaper_model_and_the_monthly_saving(db_url, env, capsys):
    config = ops_config()
    path = write_ops_config(env / "tm.yaml", config)
    seed(db_url, config)

    report = run_json(capsys, "analyze", "--config", path)
    found = {(o["kind"], o["who"], o["task_type"]): o for o in report["opportunities"]}
    assert set(found) == {("agent", "coder", "coding"), ("user", "carol", "writing")}  # not erin: she names her model

    coder = found[("agent", "coder", "coding")]
    assert (coder["model"], coder["proposed_model"], coder["requests"]) == ("claude-test", "local-test", 26)
    assert coder["saving_usd"] == pytest.approx(cost(config, "claude-test", 26) - cost(config, "local-test", 26))
    # a day of traffic extrapolated to thirty
    assert report["observed_days"] == pytest.approx(1.0, abs=0.01)
    assert coder["monthly_saving_usd"] == pytest.approx(coder["saving_usd"] * 30 / report["observed_days"], rel=1e-3)
    assert coder["basis"] == "evidence" and coder["safe"] is True
    assert coder["evidence"]["proposed"] == {"samples": 26, "avg_quality": 0.81, "judged": 0, "completion": None}
    assert coder["evidence"]["current"]["avg_quality"] == pytest.approx(0.80)

    carol = found[("user", "carol", "writing")]
    assert carol["proposed_model"] == "local-test" and carol["safe"] is False  # 6 samples: too few to be sure
    assert report["monthly_saving_usd"] == pytest.approx(coder["monthly_saving_usd"] + carol["monthly_saving_usd"],
                                                         abs=1e-3)

    assert [o["who"] for o in run_json(capsys, "analyze", "--type", "agents", "--config", path)["opportunities"]] \
        == ["coder"]
    assert [o["who"] for o in run_json(capsys, "analyze", "--type", "users", "--config", path)["opportunities"]] \
        == ["carol"]

    assert main(["analyze", "--config", path]) == 0
    table = capsys.readouterr().out
    assert "agent coder" in table and "local-test" in table and "a month in all" in table


def test_analyze_says_so_when_nothing_is_scored(db_url, env, capsys):
    path = write_ops_config(env / "tm.yaml", ops_config())
    assert main(["analyze", "--config", path]) == 0
    assert "no scored requests yet" in capsys.readouterr().out
    assert run_json(capsys, "analyze", "--config", path)["opportunities"] == []
    with pytest.raises(SystemExit):
        main(["analyze", "--type", "robots", "--config", path])
    assert "invalid choice: 'robots'" in capsys.readouterr().err


def _ask(client: openai.OpenAI) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", extra_headers={"x-tm-agent": "coder"},
        messages=[{"role": "user", "content": f"Write a Python function that merges two sorted lists ({uuid.uuid4()})"}])
    return raw.headers["x-tm-model"], raw.headers["x-tm-route"]


def _until(client: openai.OpenAI, model: str) -> tuple[str, str]:
    deadline = time.monotonic() + 10
    while True:
        got = _ask(client)
        if got[0] == model or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.slow  # a gateway with the embedding model: over 20 s
def test_optimize_applies_rules_the_gateway_obeys_and_revert_undoes_them(db_url, env, capsys, upstreams):
    anthropic, local = upstreams
    config = ops_config(anthropic.url, local.openai_url)
    path = write_ops_config(env / "tm.yaml", config)
    seed(db_url, config)
    with psycopg.connect(db_url) as conn:
        key, _ = keys.create_key(conn, "alice")
    app, served = start_gateway(config, db_url, env / "gw")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        assert _ask(client) == ("claude-test", "agent:coder")

        proposed = run_json(capsys, "optimize", "--config", path)
        assert proposed["applied"] is False and proposed["rules"] == []
        assert {(p["agent"], p["user_id"], p["task_type"], p["target_model"], p["safe"])
                for p in proposed["proposals"]} == {("coder", None, "coding", "local-test", True),
                                                    (None, "carol", "writing", "local-test", False)}
        assert _ask(client) == ("claude-test", "agent:coder")  # proposing changes nothing

        applied = run_json(capsys, "optimize", "--safe-only", "--apply", "--config", path)
        [rule] = applied["rules"]
        assert (rule["agent"], rule["task_type"], rule["target_model"], rule["created_by"]) == \
            ("coder", "coding", "local-test", "olga")
        assert rule["evidence"]["monthly_saving_usd"] > 0
        assert _until(client, "local-test") == ("local-test", f"rule:{rule['rule_id']}")

        listed = run_json(capsys, "rules")
        assert [r["rule_id"] for r in listed["operator_rules"]] == [rule["rule_id"]]
        assert main(["rules"]) == 0
        assert f"[active] {rule['rule_id']}" in capsys.readouterr().out

        # The loop rewrites its own rules every hour; the operator's stay, and win on their agent's work.
        with psycopg.connect(db_url) as conn:
            hour = conn.execute("SELECT date_trunc('hour', now())").fetchone()[0]
            conn.execute("INSERT INTO routing_rules (hour, rule_id, action, task_type, target_model, status, reason,"
                         " evidence) VALUES (%s, 'escalate:coding', 'escalate', 'coding', 'claude-test', 'active',"
                         " 'local models serve coding badly', '{}')", (hour,))
        time.sleep(0.5)
        assert _ask(client) == ("local-test", f"rule:{rule['rule_id']}")
        assert run_json(capsys, "rules")["loop_rules"][0]["rule_id"] == "escalate:coding"

        reverted = run_json(capsys, "rules", "revert", rule["rule_id"])
        assert reverted["status"] == "reverted" and reverted["reverted_by"] == "olga"
        # back to what the loop says for coding
        assert _until(client, "claude-test") == ("claude-test", "rule:escalate:coding")
        assert run_json(capsys, "rules")["operator_rules"] == []
        assert [r["status"] for r in run_json(capsys, "rules", "--all")["operator_rules"]] == ["reverted"]

        assert main(["rules", "revert", rule["rule_id"]]) == 1
        assert f"no operator rule {rule['rule_id']} in force" in capsys.readouterr().err
        assert main(["rules", "revert", "escalate:coding"]) == 1
        assert "loop's own rules are rewritten every hour" in capsys.readouterr().err
    finally:
        served.stop()
    # every request through the gateway left its row
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM requests WHERE user_id = 'alice' AND ts > now() - %s",
                            (timedelta(minutes=5),)).fetchone()[0] >= 5


def test_applying_again_replaces_the_rule_in_force(db_url, env, capsys):
    config = ops_config()
    path = write_ops_config(env / "tm.yaml", config)
    seed(db_url, config)
    first = run_json(capsys, "optimize", "--apply", "--config", path)["rules"]
    again = run_json(capsys, "optimize", "--apply", "--config", path)["rules"]
    assert len(first) == len(again) == 2
    in_force = run_json(capsys, "rules")["operator_rules"]
    assert sorted(r["rule_id"] for r in in_force) == sorted(r["rule_id"] for r in again)
    assert main(["optimize", "--config", path]) == 0
    assert "proposed only" in capsys.readouterr().out
