"""`tm mcp` driven by the official mcp package's own client over stdio: the tools answer what the commands
answer, and only an admin key may change rules."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.fakes import free_port
from tests.ops_support import ops_config, seed, write_ops_config
from tm_gateway import keys

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each test starts `tm mcp` processes: over 20 s in all


def _server(db_url: str, config: str, home: Path, key: str | None) -> StdioServerParameters:
    env = {"TM_DATABASE_URL": db_url, "TM_HOME": str(home), "PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}
    if key:
        env["TM_API_KEY"] = key
    return StdioServerParameters(command=sys.executable, args=["-m", "tm_gateway.cli", "mcp", "--config", config],
                                 env=env, cwd=str(home))


async def _calls(params: StdioServerParameters, calls: list[tuple[str, dict]]) -> tuple[list[str], list]:
    async with Client(params, read_timeout_seconds=60) as client:
        tools = sorted(t.name for t in (await client.list_tools()).tools)
        results = [await client.call_tool(name, args) for name, args in calls]
    return tools, results


def _json(result) -> object:
    assert not result.is_error, result.content[0].text
    return json.loads(result.content[0].text)


@pytest.fixture
def setup(db_url, tmp_path):
    config = ops_config()
    path = write_ops_config(tmp_path / "tm.yaml", config)
    seed(db_url, config)
    with psycopg.connect(db_url) as conn:
        admin, _ = keys.create_key(conn, "olga", admin=True)
        plain, _ = keys.create_key(conn, "bob")
    return db_url, path, tmp_path, admin, plain


def test_tools_answer_and_only_admin_keys_write(setup):
    db_url, path, home, admin, plain = setup
    tools, (analysis, providers, proposed, refused, rules_before, refused_revert) = asyncio.run(_calls(
        _server(db_url, path, home, plain),
        [("analyze", {"type": "agents"}), ("providers", {}), ("optimize", {"safe_only": True}),
         ("optimize", {"apply": True}), ("rules", {}), ("revert_rule", {"rule_id": "op-1"})]))
    assert tools == ["analyze", "optimize", "predict", "providers", "revert_rule", "rules", "status"]
    [opportunity] = _json(analysis)["opportunities"]
    assert (opportunity["who"], opportunity["proposed_model"], opportunity["safe"]) == ("coder", "local-test", True)
    assert {p["provider"] for p in _json(providers)["providers"]} == {"anthropic", "local"}
    assert [p["agent"] for p in _json(proposed)["proposals"]] == ["coder"]
    # read-only for an ordinary key: nothing was written
    assert refused.is_error and "needs an admin key" in refused.content[0].text and bob_named(refused)
    assert refused_revert.is_error and "needs an admin key" in refused_revert.content[0].text
    assert _json(rules_before)["operator_rules"] == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM operator_rules").fetchone()[0] == 0

    _, (applied, listed) = asyncio.run(_calls(
        _server(db_url, path, home, admin),
        [("optimize", {"apply": True, "safe_only": True}), ("rules", {})]))
    [rule] = _json(applied)["rules"]
    assert (rule["agent"], rule["target_model"]) == ("coder", "local-test")
    assert rule["created_by"].startswith("olga (mcp, key k_") and admin not in json.dumps(_json(applied))
    assert [r["rule_id"] for r in _json(listed)["operator_rules"]] == [rule["rule_id"]]

    _, (reverted, missing) = asyncio.run(_calls(
        _server(db_url, path, home, admin),
        [("revert_rule", {"rule_id": rule["rule_id"]}), ("revert_rule", {"rule_id": rule["rule_id"]})]))
    assert _json(reverted)["status"] == "reverted"
    assert missing.is_error and "no operator rule" in missing.content[0].text


def bob_named(result) -> bool:
    return "user bob" in result.content[0].text


def test_quota_questions_answer_what_tm_status_and_predict_answer(setup, monkeypatch, capsys):
    from tm_gateway.cli import main

    db_url, path, home, admin, plain = setup
    _, (status, one, predicted, unknown, bad_hours) = asyncio.run(_calls(
        _server(db_url, path, home, plain),
        [("status", {}), ("status", {"provider": "anthropic"}), ("predict", {"hours": 12}),
         ("status", {"provider": "nope"}), ("predict", {"hours": 0})]))
    monkeypatch.setenv("TM_DATABASE_URL", db_url)
    assert main(["status", "--json", "--config", str(path)]) == 0
    cli = json.loads(capsys.readouterr().out)
    cli = cli["providers"] if isinstance(cli, dict) else cli
    listed = _json(status)["providers"]
    assert [p["provider"] for p in listed] == [p["provider"] for p in cli]
    assert [p["used"] for p in listed] == [p["used"] for p in cli]
    assert any(p["used"] for p in listed), "the seeded traffic shows as usage"
    assert [p["provider"] for p in _json(one)["providers"]] == ["anthropic"]
    forecasts = _json(predicted)["forecasts"]
    assert {f["provider"] for f in forecasts} == {p["provider"] for p in listed}
    assert all(f["hours"] == 12 for f in forecasts)
    assert unknown.is_error and "'nope' is not one of the providers" in unknown.content[0].text
    assert bad_hours.is_error and "hours must be from 1" in bad_hours.content[0].text


def test_no_key_or_a_revoked_key_gets_nothing(setup):
    db_url, path, home, admin, plain = setup
    _, (no_key,) = asyncio.run(_calls(_server(db_url, path, home, None), [("rules", {})]))
    assert no_key.is_error and "TM_API_KEY" in no_key.content[0].text
    with psycopg.connect(db_url) as conn:
        keys.revoke(conn, "bob")
    _, (revoked,) = asyncio.run(_calls(_server(db_url, path, home, plain), [("analyze", {})]))
    assert revoked.is_error and "no Token Machine key in force" in revoked.content[0].text


def test_over_http_each_caller_is_judged_by_its_own_key(setup):
    db_url, path, home, admin, plain = setup
    port = free_port()
    env = {**os.environ, "TM_DATABASE_URL": db_url, "TM_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("TM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "tm_gateway.cli", "mcp", "--http", "--port", str(port),
                             "--config", path], env=env, cwd=home, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "tm mcp --http did not start"
                time.sleep(0.2)

        async def call(key: str | None, name: str, args: dict):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp",
                                               http_client=create_mcp_http_client(headers=headers))
            async with Client(transport, read_timeout_seconds=60) as client:
                return await client.call_tool(name, args)

        refused = asyncio.run(call(plain, "optimize", {"apply": True}))
        assert refused.is_error and "needs an admin key" in refused.content[0].text
        anonymous = asyncio.run(call(None, "rules", {}))
        assert anonymous.is_error and "Authorization: Bearer" in anonymous.content[0].text
        [rule] = _json(asyncio.run(call(admin, "optimize", {"apply": True, "safe_only": True})))["rules"]
        assert rule["agent"] == "coder"
        assert [r["rule_id"] for r in _json(asyncio.run(call(plain, "rules", {})))["operator_rules"]] == [rule["rule_id"]]
    finally:
        proc.terminate()
        proc.wait(10)
