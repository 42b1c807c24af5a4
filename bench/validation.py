"""Benchmark: what checking bodies whole costs the gateway per request (tm_gateway.schemas, as
Proxy._handle runs it: the depth check where the body has enough brackets, then the request's shape),
and per streamed event (the shape check each upstream event passes before it is relayed).

    .venv/bin/python bench/validation.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tm_gateway import schemas  # noqa: E402


def _tool(i: int) -> dict:
    return {"name": f"tool_{i}", "description": "Does one thing well. " * 10, "input_schema": {
        "type": "object", "required": ["path"], "properties": {
            "path": {"type": "string", "description": "where"},
            "options": {"type": "object", "properties": {"recursive": {"type": "boolean"},
                                                        "depth": {"type": "integer", "minimum": 0}}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}}}}}


def bodies() -> dict[str, tuple[str, dict]]:
    short = {"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    chat = {"model": "auto", "max_tokens": 512, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "a line of conversation " * 20}
        for i in range(20)]}
    # Shaped like a Claude Code turn: system blocks with cache_control, 15 tools, tool use and results.
    agent_msgs: list[dict] = [{"role": "user", "content": [{"type": "text", "text": "fix the failing test " * 30}]}]
    for i in range(20):
        agent_msgs.append({"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": f"toolu_{i}", "name": "tool_1", "input": {"path": f"src/f{i}.py"}}]})
        agent_msgs.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}",
             "content": [{"type": "text", "text": "x = 1\n" * 80}]}]})
    agent = {"model": "claude-sonnet", "max_tokens": 8192, "stream": True,
             "system": [{"type": "text", "text": "You are a coding agent. " * 200,
                         "cache_control": {"type": "ephemeral"}}],
             "tools": [_tool(i) for i in range(15)], "messages": agent_msgs,
             "metadata": {"user_id": "user_abc_session_123"}}
    return {"short chat (OpenAI)": ("openai", short), "20-turn chat (Anthropic)": ("anthropic", chat),
            "agent turn, 15 tools, 41 messages (Anthropic)": ("anthropic", agent)}


def per_call_us(fn, rounds: int) -> float:
    for _ in range(min(rounds, 200)):
        fn()
    t = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t) / rounds * 1e6


def check(fmt: str, raw: bytes) -> None:
    body = orjson.loads(raw)
    schemas.check_depth(raw, body)
    schemas.check_request(fmt, body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    out: dict = {"python": platform.python_version(), "load_avg": os.getloadavg()[0], "bodies": {}}
    for name, (fmt, body) in bodies().items():
        raw = orjson.dumps(body)
        parse = per_call_us(lambda raw=raw: orjson.loads(raw), args.rounds)
        whole = per_call_us(lambda fmt=fmt, raw=raw: check(fmt, raw), args.rounds)
        out["bodies"][name] = {"bytes": len(raw), "parse_us": round(parse, 1),
                               "depth_and_shape_us": round(whole - parse, 1)}
    events = {
        "openai": {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]},
        "anthropic": {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " word"}},
    }
    out["per_event_us"] = {k: round(per_call_us(lambda k=k, e=e: schemas.check_stream_event(k, e), args.rounds * 10), 2)
                           for k, e in events.items()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
