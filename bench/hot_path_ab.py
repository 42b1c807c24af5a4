"""CPU per call of the hot path's pieces, this working tree against a git ref, taking turns (A B B A ...).

CPU time (time.process_time) over many calls, not wall time, so a machine busy with other work changes
the figures little: the figure for a loaded machine where throughput runs are noise. Pieces:

  uuid7       tm_gateway/ids.py uuid7(), one request id
  log_prep    what the request log writer does to a batch of 1,000 rows before its COPY (copy_row, then
              redaction of secrets and NUL escaping), rows shaped like bench/gateway_latency.py's (a shared
              system prompt, a unique prompt, its messages, an answer), per row
  refresh     tm_resources/cache.py RecentHashes.refresh, the exact cache's pre-filter re-reading its
              last 30 s (overlap_s) each state poll: --refresh-rows rows (60,000 = 30 s at 2,000
              requests/s) in an embedded Postgres, per poll (this process's CPU: the event loop's)

    .venv/bin/python bench/hot_path_ab.py [--ref main] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SYSTEM = "You are a terse assistant. Answer in one sentence."


def module_at(ref: str | None, path: str, name: str) -> ModuleType:
    """The module at `path` as it is in git `ref` (None: the working tree)."""
    if ref is None:
        file = REPO / path
    else:
        src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, capture_output=True, check=True).stdout
        file = Path(tempfile.mkdtemp(prefix="tm-ab-")) / f"{name}.py"
        file.write_bytes(src)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def rows(uuid7: Callable, n: int) -> list[dict]:
    out = []
    for i in range(n):
        prompt = (f"Request {i}: summarise this note in one sentence. The nightly build on runner {i % 97} took "
                  f"{i % 13} minutes longer than usual after the dependency cache was cleared on day {i % 31}.")
        out.append({
            "id": uuid7(), "ts": datetime.now(UTC), "user_id": "bench", "api_key_id": "k_bench",
            "api_format": "openai", "endpoint": "/v1/chat/completions", "stream": False, "system": SYSTEM,
            "prompt": prompt, "requested_model": "bench-local", "model": "bench-local", "provider": "bench",
            "upstream_model": "fake-model", "route": "default", "route_reason": "the default model",
            "messages": orjson.dumps([{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": prompt}]).decode(),
            "params": '{"max_tokens":256,"temperature":0.2}',
            "attempts": '[{"model":"bench-local","provider":"bench","key":0,"status":200,"ms":1.1}]',
            "status": 200, "response_text": f"The build on runner {i % 97} was slower after a cache clear.",
            "finish_reason": "stop", "input_tokens": 42, "output_tokens": 12, "cost_usd": 6.6e-06,
            "latency_ms": 1.4, "request_hash": f"{i:064x}", "context_hash": f"{i % 7:064x}"})
    return out


def log_prep(mod: ModuleType, batch: list[dict]) -> Callable[[], None]:
    log = mod.RequestLog("postgresql://unused", spool_dir=Path(tempfile.mkdtemp(prefix="tm-ab-")),
                         redact_secrets=True)
    shared = len(inspect.signature(log._stored_or_raw).parameters) > 1  # a batch-wide memo, when it has one

    def run() -> None:
        tuples = [mod.copy_row(r) for r in batch]
        if shared:
            memo: dict[str, str] = {}
            [log._stored_or_raw(r, memo) for r in tuples]
        else:
            [log._stored_or_raw(r) for r in tuples]

    return run


def refresh_polls(mods: dict[str, ModuleType], n_rows: int, rounds: int) -> dict[str, float]:
    import psycopg

    from tm_gateway.ids import uuid7
    from tm_resources import db

    home, now = Path(tempfile.mkdtemp(prefix="tm-ab-pg-")), datetime.now(UTC)
    url = db.start_embedded(home)
    try:
        url = db.ensure_database(url, "ab")
        db.migrate(url)
        with psycopg.connect(url) as conn, conn.cursor() as cur:
            with cur.copy("COPY requests (id, ts, user_id, api_format, endpoint, status, request_hash)"
                          " FROM STDIN") as copy:
                for i in range(n_rows):
                    copy.write_row((uuid7(), now - timedelta(seconds=random.uniform(0, 25)), f"user{i % 50}",
                                    "openai", "/v1/chat/completions", 200, f"{random.getrandbits(256):064x}"))
            conn.commit()
        filters = {k: m.RecentHashes(86_400, lambda u: "u:" + u) for k, m in mods.items()}
        with psycopg.connect(url) as conn:
            for f in filters.values():
                f.load(conn)

        async def polls() -> dict[str, float]:
            times: dict[str, list[float]] = {k: [] for k in filters}
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                for r in range(rounds):
                    for k in (list(filters) if r % 2 == 0 else list(filters)[::-1]):
                        filters[k]._newest = datetime.now(UTC)  # the poll re-reads its overlap_s
                        start = time.process_time()
                        await filters[k].refresh(conn)
                        times[k].append((time.process_time() - start) * 1e6)
            assert len({len(f) for f in filters.values()}) == 1, "both must hold the same digests"
            return {k: statistics.median(v) for k, v in times.items()}

        return asyncio.run(polls())
    finally:
        for server in list(db._embedded.values()):
            server._cleanup()  # type: ignore[attr-defined]
        db._embedded.clear()


def measure(fns: dict[str, Callable[[], None]], per_call: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.process_time()
            fns[name]()
            times[name].append((time.process_time() - start) / per_call * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="main", help="the git ref to compare with (A), e.g. main or HEAD~1")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--refresh-rows", type=int, default=60_000)
    args = p.parse_args()
    ids = {"A": module_at(args.ref, "tm_gateway/ids.py", "ids_a"), "B": module_at(None, "tm_gateway/ids.py", "ids_b")}
    logs = {"A": module_at(args.ref, "tm_gateway/requestlog.py", "requestlog_a"),
            "B": module_at(None, "tm_gateway/requestlog.py", "requestlog_b")}
    n_ids, batch = 100_000, rows(ids["B"].uuid7, 1000)

    def many_ids(f: Callable) -> Callable[[], None]:
        return lambda: [f() for _ in range(n_ids)]

    results = {
        "uuid7": measure({k: many_ids(m.uuid7) for k, m in ids.items()}, n_ids, args.rounds),
        "log_prep": measure({k: log_prep(m, batch) for k, m in logs.items()}, len(batch), args.rounds),
        "refresh": refresh_polls({"A": module_at(args.ref, "tm_resources/cache.py", "cache_a"),
                                  "B": module_at(None, "tm_resources/cache.py", "cache_b")},
                                 args.refresh_rows, args.rounds),
    }
    print(f"µs of CPU per call, median of {args.rounds} interleaved rounds; A = {args.ref}, B = working tree")
    print(f"{'piece':10} {'A':>10} {'B':>10} {'B/A':>6}")
    for piece, r in results.items():
        print(f"{piece:10} {r['A']:10.2f} {r['B']:10.2f} {r['B'] / r['A']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
