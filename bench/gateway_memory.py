"""The gateway's resident memory at rest and as requests accumulate: does anything grow past its bound?

Starts the fake OpenAI-compatible upstream and the gateway (`tm gateway`, embedded Postgres in a fresh
TM_HOME, the journal and the cache on, as bench/gateway_latency.py does), sends --warmup requests, reads
the gateway's RSS at rest, then sends --requests more at --concurrency (every prompt unique), reading RSS
after every --every requests and once more at rest at the end. The rows logged must equal the answers.

Bounded by configuration: the exact cache's pre-filter (RecentHashes) is two Bloom filters of fixed size
(cache.exact_filter_capacity: 2 x 6 MB for 5 million hashes each, its pages committed as bits are set);
with --no-cache it is off. A leak shows as growth per block that does not flatten.

    .venv/bin/python bench/gateway_memory.py [--requests 100000] [--every 10000] [--no-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from gateway_latency import (
    MODEL,
    REPO,
    Child,
    Load,
    Target,
    _default_signals,
    free_port,
    stop_embedded,
    tm_command,
    wait_http,
    write_config,
)


def rss_mb(pid: int) -> float:
    """The gateway's resident memory, its worker processes included."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def send(load: Load, target: Target, n: int, concurrency: int) -> int:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await load.one(target, False)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n


async def drive(args: argparse.Namespace, target: Target, pid: int) -> list[dict]:
    points = []
    connector = aiohttp.TCPConnector(limit=max(2 * args.concurrency, 100), limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        load = Load(session)
        await send(load, target, args.warmup, args.concurrency)
        await asyncio.sleep(args.rest)
        points.append({"requests": 0, "rss_mb": round(rss_mb(pid), 1), "at": "rest after warm-up"})
        print(f"  at rest after {args.warmup} warm-up requests: {points[-1]['rss_mb']} MB", flush=True)
        done, started = 0, time.monotonic()
        while done < args.requests:
            done += await send(load, target, min(args.every, args.requests - done), args.concurrency)
            points.append({"requests": done, "rss_mb": round(rss_mb(pid), 1), "at": "under load",
                           "rps": round(done / (time.monotonic() - started))})
            print(f"  after {done:>7} requests: {points[-1]['rss_mb']} MB ({points[-1]['rps']} req/s)", flush=True)
        await asyncio.sleep(args.rest)
        points.append({"requests": done, "rss_mb": round(rss_mb(pid), 1), "at": "rest at the end"})
        print(f"  at rest after {done} requests: {points[-1]['rss_mb']} MB", flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--every", type=int, default=10_000, help="read RSS after this many requests")
    p.add_argument("--warmup", type=int, default=2_000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--rest", type=float, default=3.0, help="seconds idle before a reading at rest")
    p.add_argument("--no-cache", action="store_true", help="the gateway with its cache off")
    p.add_argument("--journal", choices=("off", "write", "fsync"), default="write")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    work = Path(tempfile.mkdtemp(prefix="tm-bench-mem-"))
    home = work / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TM_DATABASE_URL", "TM_CONFIG")}
    env.update(TM_HOME=str(home), PYTHONUNBUFFERED="1")
    fake = gw = None
    ok = False
    try:
        up_port, gw_port = free_port(), free_port()
        fake = Child("fake upstream", [sys.executable, "-m", "tests.fakes", "--port", str(up_port)], env,
                     work / "fake.log")
        wait_http(f"http://127.0.0.1:{up_port}/health", fake, 30)
        cfg = work / "bench.yaml"
        write_config(cfg, up_port, gw_port, cache=not args.no_cache, journal=args.journal)
        tm = tm_command()
        out = subprocess.run([*tm, "keys", "create", "--user", "bench"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120, preexec_fn=_default_signals, check=True)
        key = next(ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("tm-"))
        key_id = re.search(r"\(id (k_[0-9a-f]+)\)", out.stdout).group(1)  # type: ignore[union-attr]
        gw = Child("gateway", [*tm, "gateway", "--config", str(cfg), "--port", str(gw_port)], env,
                   work / "gateway.log")
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", gw, 90)
        print(f"gateway pid {gw.pid}; cache {'off' if args.no_cache else 'on'}; journal {args.journal}", flush=True)
        target = Target("gateway", f"http://127.0.0.1:{gw_port}/v1/chat/completions", MODEL,
                        {"authorization": f"Bearer {key}", "content-type": "application/json"})
        points = asyncio.run(drive(args, target, gw.pid))
        gw.stop(signal.SIGINT)

        import psycopg

        from tm_resources import db

        with psycopg.connect(db.database_url(home)) as conn:
            logged = conn.execute("SELECT count(*) FROM requests WHERE api_key_id = %s", (key_id,)).fetchone()[0]
        rest0, rest1 = points[0]["rss_mb"], points[-1]["rss_mb"]
        report = {"cache": not args.no_cache, "journal": args.journal, "concurrency": args.concurrency,
                  "points": points, "growth_mb": round(rest1 - rest0, 1),
                  "growth_bytes_per_request": round((rest1 - rest0) * 2**20 / max(1, args.requests)),
                  "rows": {"logged": logged, "answered": target.answered}, "failed": target.failed}
        ok = logged == target.answered and not target.failed
        print(f"rss at rest: {rest0} MB -> {rest1} MB after {args.requests} requests "
              f"({report['growth_bytes_per_request']} bytes a request); rows logged: {logged} of {target.answered}")
        print("--- JSON ---\n" + json.dumps(report, indent=2) + "\n--- end JSON ---", flush=True)
    finally:
        for child, sig in ((gw, signal.SIGINT), (fake, signal.SIGTERM)):
            if child is not None and child.alive():
                child.stop(sig, timeout=20)
        stop_embedded(home)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
