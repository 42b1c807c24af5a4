"""The proof: traffic through the gateway to a local model that answers one task type well and another
badly; the loop runs (`tm loop run`, through Dagster on Postgres); the rules escalate the bad type and
lock the good one; and the very next requests follow them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import psycopg
import pytest
import yaml

from tests.conftest import Gateway, make_config, query, start_gateway
from tests.fakes import FakeUpstream
from tests.traffic import OFF_TOPIC, coding_prompt, good_answer, math_prompt
from tm_gateway import keys

pytestmark = pytest.mark.slow  # end to end: the gateway, then `tm loop run` through Dagster


def local_model(fmt: str, body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    return good_answer(prompt) if "Python function" in prompt else OFF_TOPIC


def test_the_loop_rewires_routing_and_the_next_requests_follow(db_url, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TM_TEST_ANTHROPIC_KEY", "sk-ant-e2e-key-000000")
    with FakeUpstream(api_keys={"sk-ant-e2e-key-000000"}, responder=lambda f, b: good_answer(
            b["messages"][-1]["content"] if isinstance(b["messages"][-1]["content"], str) else "x")) as frontier, \
            FakeUpstream(responder=local_model) as local:
        config = make_config(frontier.url, local.openai_url)
        config_path = tmp_path / "tm.yaml"
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        with psycopg.connect(db_url) as conn:
            key_ann, _ = keys.create_key(conn, "ann")
            key_bob, _ = keys.create_key(conn, "bob")
        app, served = start_gateway(config, db_url, tmp_path)
        gw = Gateway(url=served.url, key=key_ann, user="ann", db_url=db_url, app=app, served=served)
        try:
            clients = [openai.OpenAI(base_url=gw.url + "/v1", api_key=k, max_retries=0) for k in (key_ann, key_bob)]

            def ask(i: int, prompt: str):
                return clients[i % 2].chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": prompt}])

            # Before the loop has run: every auto request goes to the default (local) model.
            for i in range(25):
                assert ask(i, coding_prompt(i)).headers["x-tm-route"] == "default"
            for i in range(15):
                raw = ask(i, math_prompt(i))
                assert raw.headers["x-tm-model"] == "local-test"
                assert raw.parse().choices[0].message.content == OFF_TOPIC
                ask(i, "No, that's wrong. " + math_prompt(i))  # the user complains at once
            gw.flush()
            typed = query(db_url, "SELECT task_type, count(*) AS n FROM requests GROUP BY 1")
            assert {r["task_type"]: r["n"] for r in typed}.get("coding", 0) >= 23

            # The traffic is the previous hour's as far as the loop is concerned.
            with psycopg.connect(db_url) as conn:
                hour = conn.execute("SELECT date_trunc('hour', min(ts)) - interval '1 hour' FROM requests").fetchone()[0]
                conn.execute("UPDATE requests SET ts = ts - interval '1 hour'")
                conn.commit()

            env = {**os.environ, "TM_DATABASE_URL": db_url, "TM_HOME": str(tmp_path / "home"),
                   "TM_CONFIG": str(config_path)}
            run = subprocess.run([sys.executable, "-m", "tm_gateway.cli", "loop", "run", "--hour",
                                  hour.strftime("%Y-%m-%d-%H:%M")], env=env, capture_output=True, text=True,
                                 timeout=300)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            rules = {r["rule_id"]: r for r in query(db_url, "SELECT * FROM routing_rules WHERE status = 'active'")}
            assert "escalate:math" in rules and "lock_local:coding" in rules

            shown = subprocess.run([sys.executable, "-m", "tm_gateway.cli", "rules"], env=env, capture_output=True,
                                   text=True, timeout=60)
            assert "escalate:math" in shown.stdout and "lock_local:coding" in shown.stdout
            board = subprocess.run([sys.executable, "-m", "tm_gateway.cli", "grades"], env=env, capture_output=True,
                                   text=True, timeout=60)
            assert "ann" in board.stdout and "bob" in board.stdout

            # The gateway picks the new rules up by itself, and the next requests follow them.
            deadline = time.monotonic() + 10
            while len(app.state.proxy.shared.rules) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            math_now = ask(0, "What is the integral of x^2 from 0 to 3?")
            code_now = ask(1, "Write a Python function that checks whether a number is prime.")
            assert math_now.headers["x-tm-model"] == "claude-test"
            assert math_now.headers["x-tm-route"] == "rule:escalate:math"
            assert math_now.parse().choices[0].message.content != OFF_TOPIC
            assert code_now.headers["x-tm-model"] == "local-test"
            assert code_now.headers["x-tm-route"] == "rule:lock_local:coding"
            last = gw.rows("ts > now() - interval '1 minute'")
            assert [(r["task_type"], r["model"], r["route"]) for r in last] == [
                ("math", "claude-test", "rule:escalate:math"), ("coding", "local-test", "rule:lock_local:coding")]
            assert all(r["route_reason"] for r in last)
        finally:
            served.stop()
