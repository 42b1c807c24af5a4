"""What Claude Code's requests cost the gateway: a body of Claude Code's shape and size (a long system
prompt, 24 tools with their schemas, a <system-reminder> before the person's words, a system-role
message) sent to the real gateway (uvicorn, embedded Postgres, fake upstreams on 127.0.0.1).

  count_tokens  POST /v1/messages/count_tokens, counted by the fake Anthropic's endpoint and by the
                local tokenizer: p50 / p90 at concurrency 1;
  messages      POST /v1/messages (not streamed) to a Claude model (system message merged, body
                passed through) and to a local model (translated to OpenAI), against the same
                request sent straight to the fake: p50 and what the gateway adds;
  steps         the request-path functions this body goes through, alone: the person's words out
                of the turn, the system merge, the translation, the local token count.

    .venv/bin/python bench/claude_code.py [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import make_config, start_gateway  # noqa: E402
from tests.fakes import FakeUpstream  # noqa: E402
from tm_gateway import keys  # noqa: E402
from tm_resources import db  # noqa: E402
from tm_resources import formats as fm  # noqa: E402
from tm_resources.embedder import word_pieces  # noqa: E402
from tm_resources.prompts import person_text  # noqa: E402

KEY = "sk-ant-bench-0123456789abcdef"
WORDS = ("read the file then edit the function so that the tests pass and explain what changed in a short "
         "summary for the reviewer with the paths involved").split()


def prose(n_words: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words))


def claude_code_body(model: str) -> dict:
    """About Claude Code 2.1's size: ~15 KB of system prompt, ~64 KB of tool schemas."""
    tools = [{"name": f"Tool{i}", "description": prose(120, i),
              "input_schema": {"type": "object", "properties": {
                  f"arg{j}": {"type": "string", "description": prose(40, j)} for j in range(6)}}}
             for i in range(24)]
    reminder = f"<system-reminder>\n{prose(80)}\n</system-reminder>\n\n"
    return {"model": model, "max_tokens": 64, "metadata": {"user_id": '{"session_id":"bench"}'},
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
                       {"type": "text", "text": prose(2400), "cache_control": {"type": "ephemeral"}}],
            "tools": tools,
            "messages": [{"role": "user", "content": [{"type": "text", "text": reminder},
                                                      {"type": "text", "text": "say hi",
                                                       "cache_control": {"type": "ephemeral"}}]},
                         {"role": "system", "content": prose(300)}]}


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]


def line(name: str, xs: list[float]) -> str:
    return f"  {name:<44} p50 {statistics.median(xs):8.3f} ms   p90 {pct(xs, 0.9):8.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    n = ap.parse_args().requests
    os.environ["TM_BENCH_KEY"] = KEY
    body = claude_code_body("claude-test")
    text = orjson.dumps(body).decode()
    print(f"body: {len(text) / 1024:.0f} KB, {word_pieces(text)} word pieces as JSON")

    user_turn = "\n".join(b["text"] for b in body["messages"][0]["content"])
    print("steps (alone, in this process)")
    print(line("person_text (the person's words)", timed(lambda: person_text(user_turn), n)))
    print(line("merge_system_messages (Anthropic)", timed(lambda: fm.merge_system_messages(body), n)))
    print(line("anthropic_request_to_openai (local)",
               timed(lambda: fm.anthropic_request_to_openai(body, model="m"), n)))
    print(line("word_pieces (local count, whole body)", timed(lambda: word_pieces(text), n)))

    with tempfile.TemporaryDirectory() as home, \
            FakeUpstream(api_keys={KEY}, responder=lambda fmt, b: "hi") as anth, \
            FakeUpstream(responder=lambda fmt, b: "hi", record=False) as local:
        anth.record = False
        url = db.start_embedded(Path(home) / "pg")
        url = db.ensure_database(url, "bench_cc")
        db.migrate(url)
        with psycopg.connect(url) as conn:
            key, _ = keys.create_key(conn, "bench")
        config = make_config(anth.url, local.openai_url, gateway={"classify_auto": False},
                             providers={"anthropic": {"kind": "anthropic", "base_url": anth.url,
                                                      "api_key_env": ["TM_BENCH_KEY"]},
                                        "local": {"kind": "openai", "base_url": local.openai_url}})
        app, served = start_gateway(config, url, Path(home))
        try:
            with httpx.Client(timeout=30) as http:
                gw = {"x-api-key": key, "anthropic-version": "2023-06-01"}
                up = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}

                def post(u: str, h: dict, b: dict) -> None:
                    r = http.post(u, json=b, headers=h)
                    assert r.status_code == 200, r.text

                def run(u: str, h: dict, b: dict) -> list[float]:
                    for _ in range(max(5, n // 10)):  # warm-up
                        post(u, h, b)
                    return timed(lambda: post(u, h, b), n)

                print(f"through the gateway, concurrency 1, {n} requests each")
                ct = served.url + "/v1/messages/count_tokens"
                direct_ct = run(anth.url + "/v1/messages/count_tokens", up,
                                {**fm.merge_system_messages(body), "model": "claude-upstream"})
                print(line("count_tokens, straight to the fake Anthropic", direct_ct))
                print(line("count_tokens, Claude model (Anthropic counts)", run(ct, gw, body)))
                print(line("count_tokens, local model (local tokenizer)", run(ct, gw, {**body, "model": "local-test"})))
                direct = run(anth.url + "/v1/messages", up,
                             {**fm.merge_system_messages(body), "model": "claude-upstream"})
                print(line("messages, straight to the fake Anthropic", direct))
                print(line("messages, Claude model (merged, passed through)",
                           run(served.url + "/v1/messages", gw, body)))
                direct_local = run(local.openai_url + "/chat/completions", {},
                                   fm.anthropic_request_to_openai(body, model="tiny-local"))
                print(line("messages, straight to the fake local server", direct_local))
                print(line("messages, local model (translated)",
                           run(served.url + "/v1/messages", gw, {**body, "model": "local-test"})))
        finally:
            served.stop()


if __name__ == "__main__":
    main()
