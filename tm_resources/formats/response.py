"""Whole responses translated both ways, and the text, tool calls and stop reason the row keeps."""

from __future__ import annotations

import json
import time
import uuid

from tm_resources.formats._common import FormatError, _dumps
from tm_resources.formats.request import _tool_arguments
from tm_resources.formats.stops import _finish_from_anthropic, _stop_from_openai
from tm_resources.formats.usage import usage_from_anthropic, usage_from_openai, usage_to_anthropic, usage_to_openai


def _strip_prefix(s, prefix: str) -> str:
    s = s if isinstance(s, str) and s else uuid.uuid4().hex
    return s[len(prefix):] if s.startswith(prefix) else s


def anthropic_response_to_openai(resp: dict, *, model: str) -> dict:
    texts = []
    tool_calls = []
    for b in resp.get("content") or ():
        t = b.get("type")
        if t == "text":
            texts.append(b.get("text") or "")
        elif t == "tool_use":
            tool_calls.append({
                "id": b.get("id"),
                "type": "function",
                "function": {"name": b.get("name"), "arguments": _dumps(b.get("input") or {})},
            })
    text = "".join(texts)
    message: dict = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-" + _strip_prefix(resp.get("id"), "msg_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": _finish_from_anthropic(resp.get("stop_reason"), bool(tool_calls)),
            "logprobs": None,
        }],
        "usage": usage_to_openai(usage_from_anthropic(resp.get("usage"))),
    }


def openai_response_to_anthropic(resp: dict, *, model: str) -> dict:
    choices = resp.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise FormatError("upstream response has no choices")
    choice = choices[0]
    msg = choice.get("message") or {}
    content = msg.get("content")
    blocks: list[dict] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        text = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        if text:
            blocks.append({"type": "text", "text": text})
    if not blocks and msg.get("refusal"):
        blocks.append({"type": "text", "text": msg["refusal"]})
    tcs = msg.get("tool_calls") or ()
    for k, tc in enumerate(tcs):
        fn = tc.get("function") or {}
        blocks.append({
            "type": "tool_use",
            "id": tc.get("id") or "toolu_" + uuid.uuid4().hex[:24],
            "name": fn.get("name") or "",
            "input": _tool_arguments(
                fn.get("arguments"), f"upstream choices[0].message.tool_calls[{k}].function.arguments"
            ),
        })
    return {
        "id": "msg_" + _strip_prefix(resp.get("id"), "chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": _stop_from_openai(choice.get("finish_reason"), bool(tcs)),
        "stop_sequence": None,
        "usage": usage_to_anthropic(usage_from_openai(resp.get("usage"))),
    }


def _log_text(text: str, calls) -> str:
    lines = [text] if text else []
    for name, args in calls:
        lines.append(f"[tool_call {name} {args}]")
    return "\n".join(lines)


def _compact_args(args) -> str:
    if isinstance(args, str):
        if not args or args.isspace():
            return "{}"
        try:
            return _dumps(json.loads(args))
        except ValueError:
            return args
    return _dumps(args if args is not None else {})


def response_text_openai(resp: dict) -> str:
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices:
        return ""
    msg = choices[0].get("message") or {}
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    calls = []
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        calls.append((fn.get("name"), _compact_args(fn.get("arguments"))))
    return _log_text(content or "", calls)


def response_text_anthropic(resp: dict) -> str:
    texts, calls = [], []
    for b in (resp.get("content") if isinstance(resp, dict) else None) or ():
        t = b.get("type")
        if t == "text":
            texts.append(b.get("text") or "")
        elif t == "tool_use":
            calls.append((b.get("name"), _dumps(b.get("input") or {})))
    return _log_text("".join(texts), calls)


def stop_reason_openai(resp) -> str | None:
    try:
        return resp["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def stop_reason_anthropic(resp) -> str | None:
    return resp.get("stop_reason") if isinstance(resp, dict) else None
