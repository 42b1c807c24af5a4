"""Claude Code as a client: what it sends (system-role messages, cache_control with ttl and scope, its
session in metadata, <system-reminder> blocks, its own model names, count_tokens) works through the
gateway with the official SDK; and the real Claude Code, installed from npm, answers through it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import anthropic
import psycopg
import pytest

from tests.conftest import make_config, query, start_gateway
from tests.fakes import FakeUpstream
from tm_gateway import keys

REMINDER = ("<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
            "# currentDate\nToday's date is 2026-11-30.\n</system-reminder>\n\n")


def answer_naming_the_model(fmt: str, body: dict) -> str:
    return f"answered by {body['model']}"


@pytest.fixture
def cc(db_url, monkeypatch, tmp_path):
    """The gateway as a Claude Code user would configure it: presets, aliases for Claude Code's own model
    names, tier chains for `auto`; fake Anthropic and local upstreams that name the model answering."""
    monkeypatch.setenv("TM_TEST_ANTHROPIC_KEY", "sk-ant-test-0123456789abcdef")
    with FakeUpstream(api_keys={"sk-ant-test-0123456789abcdef"}, responder=answer_naming_the_model) as anth, \
            FakeUpstream(responder=answer_naming_the_model) as local:
        config = make_config(
            anth.url, local.openai_url,
            gateway={"refresh_interval_s": 0.1, "classify_auto": False},
            presets={"tm:basic": ["local-test", "claude-test"]},
            aliases={"claude-opus-*": "tm:basic", "claude-haiku-*": "local-test"},
            routing={"tiers": {"chains": {"SIMPLE": ["local-test"], "MEDIUM": ["claude-test"],
                                          "COMPLEX": ["claude-test"], "REASONING": ["claude-test"]}}})
        with psycopg.connect(db_url) as conn:
            key, _ = keys.create_key(conn, "dev")
        app, served = start_gateway(config, db_url, tmp_path)
        try:
            yield served.url, key, app, db_url, anth, local
        finally:
            served.stop()


def rows(app, db_url, where="true", params=()):
    assert app.state.proxy.request_log.flush()
    return query(db_url, f"SELECT * FROM requests WHERE {where} ORDER BY ts, id", params)


def client(url, key) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


# -- count_tokens ---------------------------------------------------------------------------------


def test_count_tokens_asks_anthropic_and_counts_locally_for_local_models(cc):
    url, key, app, db_url, anth, local = cc
    msgs = [{"role": "user", "content": "how many tokens are in this short prompt"}]
    raw = client(url, key).messages.with_raw_response.count_tokens(
        model="claude-test", messages=msgs, system="be brief", extra_headers={"x-claude-code-session-id": "s-1"})
    assert raw.parse().input_tokens == 10  # the fake Anthropic's own count (words), upstream name sent
    assert raw.headers["x-tm-token-counter"] == "anthropic"
    assert [r.body["model"] for r in anth.requests if r.path == "/v1/messages/count_tokens"] == ["claude-upstream"]
    raw = client(url, key).messages.with_raw_response.count_tokens(model="local-test", messages=msgs)
    assert raw.headers["x-tm-token-counter"] == "local" and 8 <= raw.parse().input_tokens <= 12
    assert not local.requests  # the local server has no count endpoint: nothing is sent to it
    long = [{"role": "user", "content": "count every word of this prompt " * 100}]
    assert 550 <= client(url, key).messages.count_tokens(model="local-test", messages=long).input_tokens <= 700
    # A preset counts for its first model; an alias resolves first.
    raw = client(url, key).messages.with_raw_response.count_tokens(model="claude-opus-4-8", messages=msgs)
    assert raw.headers["x-tm-model"] == "local-test" and raw.headers["x-tm-token-counter"] == "local"

    logged = rows(app, db_url, "endpoint = '/v1/messages/count_tokens'")
    assert [r["route"] for r in logged] == ["count_tokens"] * 4 and {r["status"] for r in logged} == {200}
    # Counted, never spent: no tokens, no cost; the loop reads only the completion endpoints.
    assert all(r["input_tokens"] == 0 and r["cost_usd"] == 0 for r in logged)
    assert logged[0]["route_reason"] == "10 input tokens, counted by anthropic" and logged[0]["session_id"] == "s-1"


def test_count_tokens_errors_come_back_in_anthropic_shape(cc):
    url, key, app, db_url, anth, local = cc
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError):
        client(url, "tm-wrong").messages.count_tokens(model="claude-test", messages=msgs)
    with pytest.raises(anthropic.NotFoundError) as e:
        client(url, key).messages.count_tokens(model="gpt-nothing", messages=msgs)
    assert "ANTHROPIC_MODEL" in e.value.message and "aliases" in e.value.message
    anth.reset()
    anth.fail(503)
    raw = client(url, key).messages.with_raw_response.count_tokens(model="claude-test", messages=msgs)
    assert raw.headers["x-tm-token-counter"] == "local (anthropic answered 503)" and raw.parse().input_tokens >= 1
    assert len(rows(app, db_url, "endpoint = '/v1/messages/count_tokens'")) == 2  # the 401 has no user


# -- what Claude Code's requests carry ------------------------------------------------------------


CACHED_SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
    {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
]


def claude_code_messages(words: str) -> list[dict]:
    return [
        {"role": "user", "content": [
            {"type": "text", "text": REMINDER},
            {"type": "text", "text": words, "cache_control": {"type": "ephemeral", "ttl": "5m", "scope": "global"}}]},
        {"role": "system", "content": "Available agent types: claude, Explore."},
    ]


def test_cache_control_and_system_messages_reach_anthropic_intact(cc):
    url, key, app, db_url, anth, local = cc
    msgs = claude_code_messages("say hi")
    client(url, key).messages.create(model="claude-test", max_tokens=50, system=CACHED_SYSTEM, messages=msgs,
                                     extra_headers={"anthropic-beta": "prompt-caching-scope-2026-01-05"})
    sent = anth.requests[-1]
    # The system message moved to the end of the top-level system; every block, every field kept.
    assert sent.body["system"] == [*CACHED_SYSTEM, {"type": "text", "text": "Available agent types: claude, Explore."}]
    assert sent.body["messages"] == msgs[:1]
    assert sent.headers["anthropic-beta"] == "prompt-caching-scope-2026-01-05"
    # Without a system message the body goes through as it came (only the model name changes).
    plain = msgs[:1]
    client(url, key).messages.create(model="claude-test", max_tokens=50, system=CACHED_SYSTEM, messages=plain)
    assert anth.requests[-1].body == {"model": "claude-upstream", "max_tokens": 50, "system": CACHED_SYSTEM,
                                      "messages": plain}


def test_system_messages_stay_in_place_for_a_local_model(cc):
    url, key, app, db_url, anth, local = cc
    msgs = claude_code_messages("say hi") + [{"role": "assistant", "content": "hi"},
                                             {"role": "user", "content": "and again"}]
    got = client(url, key).messages.create(model="local-test", max_tokens=50, system="be brief", messages=msgs)
    assert got.content[0].text == "answered by tiny-local"
    assert [(m["role"], m["content"][:15]) for m in local.requests[-1].body["messages"]] == [
        ("system", "be brief"), ("user", REMINDER[:15]), ("system", "Available agent"),
        ("assistant", "hi"), ("user", "and again")]


def test_a_request_one_provider_cannot_carry_goes_down_the_preset(cc):
    url, key, app, db_url, anth, local = cc
    # A server tool has no OpenAI form: the local model cannot take it, the preset's next model can.
    raw = client(url, key).messages.with_raw_response.create(
        model="tm:basic", max_tokens=50, messages=[{"role": "user", "content": "search the web"}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert raw.headers["x-tm-model"] == "claude-test" and raw.parse().content[0].text == "answered by claude-upstream"
    assert not local.requests
    (row,) = rows(app, db_url)
    assert [(a["model"], a.get("failure")) for a in row["attempts"]] == [("local-test", "client_error"),
                                                                          ("claude-test", None)]
    assert "not translatable" in row["attempts"][0]["outcome"]
    # An upstream's refusal of a translated request also moves on (it may be the translation it refused).
    local.fail(400, message="unsupported parameter")
    raw = client(url, key).messages.with_raw_response.create(
        model="tm:basic", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tm-model"] == "claude-test"


def test_aliases_and_the_404_that_tells_a_newcomer_what_to_do(cc):
    url, key, app, db_url, anth, local = cc
    raw = client(url, key).messages.with_raw_response.create(
        model="claude-opus-4-8", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tm-alias"] == "claude-opus-4-8 -> tm:basic" and raw.headers["x-tm-model"] == "local-test"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(url, key).messages.create(model="gpt-nothing", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert "--model" in e.value.message and "ANTHROPIC_MODEL" in e.value.message and "aliases" in e.value.message
    aliased, unknown = rows(app, db_url)
    assert aliased["requested_model"] == "tm:basic" and aliased["route"] == "preset:tm:basic"
    assert aliased["route_reason"].startswith("'claude-opus-4-8' is an alias (claude-opus-*) of tm:basic; ")
    assert unknown["status"] == 404 and unknown["requested_model"] == "gpt-nothing"


@pytest.mark.parametrize("user_id", [
    json.dumps({"device_id": "5e6f", "account_uuid": "", "session_id": "d2a6fea8-2d34-4669-90f0-ca64eae66d3d"}),
    "user_5e6f_account__session_d2a6fea8-2d34-4669-90f0-ca64eae66d3d",
])
def test_the_session_is_read_from_either_form_of_metadata(cc, user_id):
    url, key, app, db_url, anth, local = cc
    client(url, key).messages.create(model="claude-test", max_tokens=50, metadata={"user_id": user_id},
                                     messages=[{"role": "user", "content": "hi"}])
    assert rows(app, db_url)[0]["session_id"] == "d2a6fea8-2d34-4669-90f0-ca64eae66d3d"


def test_routing_and_the_prompt_column_see_what_the_person_wrote(cc):
    url, key, app, db_url, anth, local = cc
    msgs = claude_code_messages("say hi")
    raw = client(url, key).messages.with_raw_response.create(model="auto", max_tokens=50, messages=msgs)
    # 'say hi' is SIMPLE; with the reminder counted it was not.
    assert raw.headers["x-tm-route"] == "tier:SIMPLE" and raw.headers["x-tm-model"] == "local-test"
    (row,) = rows(app, db_url)
    assert row["prompt"] == "say hi"
    assert row["messages"] == msgs  # the row keeps everything that was sent
    # A turn of tool results keeps the tier of the task the person gave (no model switch mid-task).
    task = "refactor the request log writer so that batches are retried with backoff, and add tests"
    loop = [{"role": "user", "content": [{"type": "text", "text": REMINDER}, {"type": "text", "text": task}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read",
                                               "input": {"file_path": "tm_gateway/requestlog.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "import os"}]}]
    heads = [client(url, key).messages.with_raw_response.create(model="auto", max_tokens=50, messages=m).headers
             for m in (loop[:1], loop)]
    assert [(h["x-tm-route"], h["x-tm-model"]) for h in heads] == [("tier:MEDIUM", "claude-test")] * 2
    assert [r["prompt"] for r in rows(app, db_url)[1:]] == [task, ""]


# -- the real Claude Code -------------------------------------------------------------------------

CLAUDE_CODE_DIR = Path(__file__).resolve().parent.parent / ".tm" / "claude-code"
# The version these tests were written against (what it sends was recorded from it); raise it on purpose.
CLAUDE_CODE_VERSION = "2.1.197"


@pytest.fixture(scope="session")
def claude_code() -> Path:
    """Claude Code from npm, installed once into .tm/claude-code (kept between runs)."""
    exe = CLAUDE_CODE_DIR / "node_modules" / ".bin" / "claude"
    if not exe.exists():
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            pytest.skip("Claude Code needs node and npm, and this machine has none")
        CLAUDE_CODE_DIR.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error",
                                   "--prefix", str(CLAUDE_CODE_DIR), f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"],
                                  capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install @anthropic-ai/claude-code took over 4 minutes")
        if done.returncode != 0 or not exe.exists():
            pytest.skip(f"npm install @anthropic-ai/claude-code failed: {(done.stderr or done.stdout)[-500:]}")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                             env={"PATH": os.environ.get("PATH", ""), "HOME": str(CLAUDE_CODE_DIR)})
    if version.returncode != 0:
        pytest.skip(f"Claude Code does not run here: {version.stderr[-500:]}")
    return exe


def run_claude(exe: Path, url: str, key: str, home: Path, prompt: str, *, model: str | None = None,
               env: dict[str, str] | None = None, session: str | None = None) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    base = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        # No call leaves the machine: no telemetry, no update checks, no error reports.
        "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
        "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": key,
    }
    cmd = [str(exe), "-p", prompt, *(["--model", model] if model else []),
           *(["--session-id", session] if session else [])]
    return subprocess.run(cmd, env={**base, **(env or {})}, cwd=home, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # end to end: the real Claude Code CLI
def test_claude_code_answers_through_the_gateway(cc, claude_code, tmp_path):
    url, key, app, db_url, anth, local = cc
    runs = [  # (how it is told the model, what answers)
        ({"model": "claude-test"}, "claude-test", "claude-upstream"),
        ({"model": "local-test"}, "local-test", "tiny-local"),
        ({"model": "auto"}, "local-test", "tiny-local"),  # 'say hi' is SIMPLE: the local chain
        ({"env": {"ANTHROPIC_MODEL": "tm:basic"}}, "local-test", "tiny-local"),
        # Its own default model, and a bearer token instead of a key: the alias takes it to the preset.
        ({"env": {"ANTHROPIC_API_KEY": "", "ANTHROPIC_AUTH_TOKEN": key}}, "local-test", "tiny-local"),
    ]
    sessions = []
    for i, (how, model, upstream) in enumerate(runs):
        session = str(uuid.uuid4())
        sessions.append(session)
        done = run_claude(claude_code, url, key, tmp_path / f"home{i}", "say hi", session=session, **how)
        assert done.returncode == 0, f"{how}: {done.stderr[-2000:]}"
        assert f"answered by {upstream}" in done.stdout, (how, done.stdout, done.stderr[-2000:])
        logged = rows(app, db_url, "session_id = %s", (session,))
        assert logged and {r["model"] for r in logged if r["endpoint"] == "/v1/messages"} == {model}, how
        assert all(r["status"] == 200 for r in logged), [(r["endpoint"], r["error_message"]) for r in logged]
        assert [r["prompt"] for r in logged if r["endpoint"] == "/v1/messages"][-1] == "say hi"
    # Every row Claude Code caused carries its session (nothing it sent went unattributed).
    assert {r["session_id"] for r in rows(app, db_url)} == set(sessions)
    # What it really sent: streams, its session in metadata, system-role messages; none reached an
    # upstream unmerged or untranslated.
    sent = [r.body for r in anth.requests if r.path == "/v1/messages"]
    assert sent and all(b["stream"] and all(m["role"] != "system" for m in b["messages"]) for b in sent)
    assert any(m["role"] == "system" for r in local.requests for m in r.body["messages"][1:])


@pytest.mark.parametrize("text, person", [
    (REMINDER + "say hi", "say hi"),
    ("fix the bug\n<system-reminder>file a.py changed</system-reminder>", "fix the bug"),
    ("<local-command-stdout>ok</local-command-stdout>\n<system-reminder>x</system-reminder>\nthanks", "thanks"),
    ("compare <b>bold</b> and <i>italic</i>", "compare <b>bold</b> and <i>italic</i>"),  # the person's own tags stay
])
def test_the_person_text_leaves_out_what_the_client_added(text, person):
    from tm_resources.prompts import person_text

    assert person_text(text) == person
