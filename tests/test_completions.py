"""The loop's judge asks its model through the anthropic SDK (Anthropic providers) or httpx
(OpenAI-compatible ones): what the fake providers received, and what becomes of failures."""

from __future__ import annotations

import pytest

from tests.conftest import ANTHROPIC_TEST_KEY, make_config
from tests.fakes import FakeUpstream, free_port
from tm_assets.judge import judge_answers

CONVERSATIONS = [[{"role": "system", "content": "Score 0-10."}, {"role": "user", "content": f"answer {i}"}]
                 for i in range(3)]


def score(text: str) -> float | None:
    return float(text) / 10 if text.strip().isdigit() else None


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setenv("TM_TEST_ANTHROPIC_KEY", ANTHROPIC_TEST_KEY)
    with FakeUpstream(api_keys={ANTHROPIC_TEST_KEY}, responder=lambda fmt, body: "7") as anth, \
            FakeUpstream(responder=lambda fmt, body: "9") as local:
        yield anth, local


def test_an_anthropic_judge_is_asked_through_the_anthropic_sdk(fakes):
    anth, local = fakes
    config = make_config(anth.url, local.openai_url, loop={"judge_model": "claude-test"})
    assert judge_answers(config, CONVERSATIONS, score) == [0.7, 0.7, 0.7]
    assert len(anth.requests) == 3 and not local.requests
    req = anth.requests[0]
    assert req.path == "/v1/messages"
    assert ANTHROPIC_TEST_KEY in (req.headers.get("x-api-key"), req.headers.get("authorization", "")[len("Bearer "):])
    assert req.headers["user-agent"].startswith("AsyncAnthropic/Python")
    assert req.body["model"] == "claude-upstream" and req.body["system"] == "Score 0-10."
    assert req.body["max_tokens"] == 16


def test_an_openai_compatible_judge_is_asked_through_httpx(fakes):
    anth, local = fakes
    config = make_config(anth.url, local.openai_url, loop={"judge_model": "local-test"})
    assert judge_answers(config, CONVERSATIONS, score) == [0.9, 0.9, 0.9]
    # The judge asks concurrently: the requests arrive in any order, one per conversation.
    assert sorted(str(r.body["messages"]) for r in local.requests) == sorted(str(c) for c in CONVERSATIONS)
    req = next(r for r in local.requests if r.body["messages"] == CONVERSATIONS[0])
    assert req.path == "/v1/chat/completions" and req.headers["user-agent"].startswith("python-httpx/")
    assert req.body["model"] == "tiny-local" and req.body["messages"] == CONVERSATIONS[0]
    assert req.body["max_tokens"] == 16 and req.body["temperature"] == 0


@pytest.mark.parametrize("judge", ["claude-test", "local-test"])
def test_an_error_status_leaves_that_score_missing(fakes, judge):
    anth, local = fakes
    for fake in fakes:
        fake.fail(500, times=1)
    config = make_config(anth.url, local.openai_url, loop={"judge_model": judge})
    got = judge_answers(config, CONVERSATIONS, score)
    assert got.count(None) == 1 and set(got) == {None, 0.7 if judge == "claude-test" else 0.9}


@pytest.mark.parametrize("judge", ["claude-test", "local-test"])
def test_an_unreachable_judge_gives_no_scores(monkeypatch, judge):
    monkeypatch.setenv("TM_TEST_ANTHROPIC_KEY", ANTHROPIC_TEST_KEY)
    nowhere = f"http://127.0.0.1:{free_port()}"
    config = make_config(nowhere, nowhere + "/v1", loop={"judge_model": judge})
    assert judge_answers(config, CONVERSATIONS, score) == [None, None, None]


def test_an_anthropic_provider_without_a_key_gets_none_not_the_environments(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-the-environment-0123456789")
    with FakeUpstream(responder=lambda fmt, body: "6") as keyless:
        config = make_config(keyless.url, keyless.openai_url, loop={"judge_model": "claude-test"},
                             providers={"anthropic": {"kind": "anthropic", "base_url": keyless.url}})
        assert judge_answers(config, CONVERSATIONS[:1], score) == [0.6]
        sent = keyless.requests[0].headers
    assert "authorization" not in sent and "x-api-key" not in sent
