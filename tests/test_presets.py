"""Choosing a model from configuration: presets as prioritized chains, per-user and per-agent
defaults for `auto`, and premium models only for users allowed them (a 403 otherwise, never a bill)."""

from __future__ import annotations

import anthropic
import openai
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tm_gateway import keys
from tm_resources.config import parse_config


@pytest.fixture
def gw(db_url, upstreams, tmp_path):
    anth, local = upstreams
    base = make_config(anth.url, local.openai_url)
    data = base.model_dump(mode="json")
    data["models"]["claude-opus-test"] = {"provider": "anthropic", "upstream": "opus-up", "tier": "premium",
                                         "context_window": 200000, "price": {"input": 15, "output": 75}}
    data["presets"] = {"tm:basic": ["local-test"], "tm:balanced": ["local-test", "claude-test"],
                       "tm:complex": ["claude-opus-test", "claude-test"]}
    data["users"] = {"boss": {"premium": True}, "writer": {"model": "claude-test"}}
    data["agents"] = {"marketing": {"model": "claude-test"}}
    data["gateway"]["classify_auto"] = False
    config = parse_config(data)
    with psycopg.connect(db_url) as conn:
        k = {u: keys.create_key(conn, u)[0] for u in ("staff", "boss", "writer")}
    app, served = start_gateway(config, db_url, tmp_path)
    try:
        yield served.url, k, app, db_url, anth, local
    finally:
        served.stop()


def client(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_a_preset_is_a_prioritized_chain(gw):
    url, k, app, db_url, anth, local = gw
    raw = client(url, k["staff"]).chat.completions.with_raw_response.create(
        model="tm:balanced", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tm-model"] == "local-test" and raw.headers["x-tm-route"] == "preset:tm:balanced"
    local.fail(503, times=1)
    raw = client(url, k["staff"]).chat.completions.with_raw_response.create(
        model="tm:balanced", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tm-model"] == "claude-test"  # the next in the preset's chain


def test_the_model_list_offers_auto_and_the_presets(gw):
    url, k, app, db_url, anth, local = gw
    ids = [m.id for m in client(url, k["staff"]).models.list()]
    assert ids == ["auto", "tm:balanced", "tm:basic", "tm:complex", "claude-opus-test", "claude-test", "local-test"]


def test_premium_only_for_users_allowed_it(gw):
    url, k, app, db_url, anth, local = gw
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(url, k["staff"]).chat.completions.create(model="claude-opus-test",
                                                        messages=[{"role": "user", "content": "hi"}])
    assert "premium" in e.value.message
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=url, api_key=k["staff"], max_retries=0).messages.create(
            model="tm:complex", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    raw = client(url, k["boss"]).chat.completions.with_raw_response.create(
        model="tm:complex", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tm-model"] == "claude-opus-test"
    assert not any(r.body["model"] == "opus-up" for r in anth.requests[:-1])
    assert app.state.proxy.request_log.flush()
    refused = query(db_url, "SELECT user_id, status, error_class FROM requests WHERE status = 403")
    assert {(r["user_id"], r["error_class"]) for r in refused} == {("staff", "premium_not_allowed")}


def test_user_and_agent_defaults_for_auto(gw):
    url, k, app, db_url, anth, local = gw
    ask = lambda key, **kw: client(url, key).chat.completions.with_raw_response.create(  # noqa: E731
        model="auto", messages=[{"role": "user", "content": "hi"}], **kw)
    assert ask(k["staff"]).headers["x-tm-model"] == "local-test"
    assert ask(k["writer"]).headers["x-tm-route"] == "user:writer"
    raw = ask(k["staff"], extra_headers={"x-tm-agent": "marketing"})
    assert raw.headers["x-tm-model"] == "claude-test" and raw.headers["x-tm-route"] == "agent:marketing"
