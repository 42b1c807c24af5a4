"""Loop detection through the official SDKs against real Postgres: the same tool call (name and
arguments) answered three times within the window in one session is refused, in both formats, before any
provider is called; different arguments, other sessions, retries and time passing are not loops."""

from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest

from tests.test_limits import an, limited, oa  # noqa: F401 - the fixture

LOOP = {"loop": {"repeats": 3, "window_s": 60}}


def openai_turns(calls: list[tuple[str, dict]]) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "what is in this folder?"}]
    for i, (name, args) in enumerate(calls):
        cid = f"call_{i}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": cid, "content": "a.txt b.txt"})
    return messages


def anthropic_turns(calls: list[tuple[str, dict]]) -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "what is in this folder?"}]
    for i, (name, args) in enumerate(calls):
        tid = f"toolu_{i}"
        messages.append({"role": "assistant", "content": [{"type": "tool_use", "id": tid, "name": name, "input": args}]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": "a.txt"}]})
    return messages


TOOLS_O = [{"type": "function", "function": {"name": "list_files", "parameters": {"type": "object"}}}]
TOOLS_A = [{"name": "list_files", "input_schema": {"type": "object"}}]


def send_openai(gw, calls, session="s-1"):
    return oa(gw, **{"x-tm-session": session}).chat.completions.create(
        model="local-test", max_tokens=20, messages=openai_turns(calls), tools=TOOLS_O)


def send_anthropic(gw, calls, metadata_session="5b6c0e4e-0d55-4c3e-9a77-8b1f7a1c2d3e"):
    return an(gw).messages.create(
        model="claude-test", max_tokens=20, messages=anthropic_turns(calls), tools=TOOLS_A,
        metadata={"user_id": json.dumps({"device_id": "d", "session_id": metadata_session})})


def test_the_third_same_call_is_refused_openai(limited, upstreams):
    gw = limited(LOOP)
    _, local = upstreams
    same = ("list_files", {"path": ".", "all": True})
    send_openai(gw, [same])
    send_openai(gw, [same, same])
    # The same request again (a client retry) is not a new call.
    send_openai(gw, [same, same])
    with pytest.raises(openai.BadRequestError) as caught:
        # Arguments spelt in another key order are the same call.
        send_openai(gw, [same, same, ("list_files", {"all": True, "path": "."})])
    err = caught.value
    assert err.code == "loop_detected"
    assert "'list_files'" in err.message and "3 times" in err.message
    assert len(local.requests) == 3  # the refused one reached no model
    rows = gw.rows("error_class = 'loop_detected'")
    assert len(rows) == 1 and rows[0]["status"] == 400 and "list_files" in rows[0]["error_message"]
    # Another session doing the same is its own conversation.
    send_openai(gw, [same, same], session="s-2")


def test_the_third_same_call_is_refused_anthropic(limited, upstreams):
    gw = limited(LOOP)
    anthropic_fake, _ = upstreams
    same = ("read_file", {"path": "README.md"})
    send_anthropic(gw, [same])
    send_anthropic(gw, [same, same])
    with pytest.raises(anthropic.BadRequestError) as caught:
        send_anthropic(gw, [same, same, same])
    body = caught.value.body["error"]
    assert body["type"] == "invalid_request_error"
    assert "'read_file'" in body["message"] and "loop detected" in body["message"]
    assert len(anthropic_fake.requests) == 2
    [row] = gw.rows("error_class = 'loop_detected'")
    assert row["api_format"] == "anthropic"


def test_different_arguments_are_no_loop(limited):
    gw = limited(LOOP)
    calls = [("list_files", {"path": p}) for p in ("a", "b", "c", "d")]
    for n in range(1, 5):
        send_openai(gw, calls[:n])
        send_anthropic(gw, calls[:n])
    assert not gw.rows("error_class = 'loop_detected'")


def test_calls_spread_beyond_the_window_are_no_loop(limited):
    gw = limited({"loop": {"repeats": 3, "window_s": 1}})
    same = ("list_files", {"path": "."})
    for n in range(1, 5):
        send_anthropic(gw, [same] * n)
        time.sleep(0.6)  # two calls at most within any second
    assert not gw.rows("error_class = 'loop_detected'")
    # Quickly, the same calls are a loop.
    send_anthropic(gw, [same] * 5, metadata_session="other")  # records call 4 of this session
    send_anthropic(gw, [same] * 6, metadata_session="other")
    with pytest.raises(anthropic.BadRequestError):
        send_anthropic(gw, [same] * 7, metadata_session="other")


def test_thresholds_are_configurable(limited):
    gw = limited({"loop": {"repeats": 2, "window_s": 60}})
    same = ("grep", {"pattern": "TODO"})
    send_openai(gw, [same])
    with pytest.raises(openai.BadRequestError) as caught:
        send_openai(gw, [same, same])
    assert "2 times" in caught.value.message
