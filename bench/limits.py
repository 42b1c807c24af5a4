"""Benchmark: what rate limits and loop detection add to a request, configured and not.

Starts one embedded Postgres (in this process, under a temp TM_HOME), a fake OpenAI-compatible upstream
(`python -m tests.fakes`) and three gateways (`tm gateway`, separate processes on that database):

  none      limits.loop.repeats 0 and no limit: nothing enforced, no limits object, no query
  default   the shipped defaults: loop detection on, no rate limit
  all       every limit set (high enough never to refuse): requests per minute, tokens per turn, turns
            per hour and turns in flight, so every request takes two counters and a lease and frees it

and drives them from this process with aiohttp at concurrency 1, in interleaved blocks (so drift hits all
alike): plain requests to each, and requests that carry a tool result (what loop detection reads) to
`default`. Reports p50/p90/p99 per target and each one's p50 minus `none`'s; then throughput at
--concurrency for --duration seconds per target.

    .venv/bin/python bench/limits.py [--requests 1500] [--block 50] [--concurrency 20] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway_latency import Child, free_port, machine_info, summary, tm_command, wait_http  # noqa: E402

MODEL = "bench-local"
LIMITS = {
    "none": "limits:\n  loop: {repeats: 0}\n",
    "default": "",
    "all": ("limits:\n  requests_per_minute: 10000000\n  tokens_per_turn: 10000000\n"
            "  turns_per_hour: 10000000\n  concurrent_turns: 100000\n"),
}


def write_config(path: Path, upstream_port: int, gateway_port: int, limits: str) -> None:
    path.write_text(
        f"gateway:\n  host: 127.0.0.1\n  port: {gateway_port}\n  classify_auto: false\n"
        "cache:\n  enabled: false\n"
        "providers:\n"
        f"  bench:\n    kind: openai\n    base_url: http://127.0.0.1:{upstream_port}/v1\n"
        f"models:\n  {MODEL}:\n    provider: bench\n    upstream: fake-model\n    tier: local\n"
        f"defaults:\n  model: {MODEL}\n" + limits
    )


class Bodies:
    def __init__(self) -> None:
        self.i = 0

    def plain(self) -> bytes:
        self.i += 1
        return orjson.dumps({"model": MODEL, "max_tokens": 64, "messages": [
            {"role": "user", "content": f"Request {self.i}: summarise the build log of runner {self.i % 97}."}]})

    def tool_result(self) -> bytes:
        # Each request answers a new call (new id, new arguments): loop detection records and counts it.
        self.i += 1
        cid = f"call_{self.i}"
        return orjson.dumps({"model": MODEL, "max_tokens": 64, "messages": [
            {"role": "user", "content": "what is in the logs folder?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": cid, "type": "function", "function": {
                "name": "list_files", "arguments": json.dumps({"path": f"logs/{self.i}"})}}]},
            {"role": "tool", "tool_call_id": cid, "content": "build.log test.log"}]})


async def one(session: aiohttp.ClientSession, url: str, headers: dict, data: bytes) -> float:
    start = time.perf_counter_ns()
    async with session.post(url, data=data, headers=headers) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:300]!r}")
    return (time.perf_counter_ns() - start) / 1e6


async def run(args: argparse.Namespace, ports: dict[str, int], key: str) -> dict:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json", "x-tm-session": "bench"}
    bodies = Bodies()
    targets = {name: (f"http://127.0.0.1:{port}/v1/chat/completions", bodies.plain) for name, port in ports.items()}
    targets["default, tool result"] = (targets["default"][0], bodies.tool_result)
    lat: dict[str, list[float]] = {name: [] for name in targets}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url, make in targets.values():  # warm-up: connections, prepared statements, first loads
            for _ in range(100):
                await one(session, url, headers, make())
        names = list(targets)
        for b in range(args.requests // args.block):
            order = names if b % 2 == 0 else names[::-1]
            for name in order:
                url, make = targets[name]
                for _ in range(args.block):
                    lat[name].append(await one(session, url, headers, make()))
        c1 = {name: summary(v) for name, v in lat.items()}
        base = c1["none"]["p50"]
        for name in c1:
            c1[name]["p50_minus_none_ms"] = round(c1[name]["p50"] - base, 3)
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for _round in range(2):
            for name, (url, make) in targets.items():
                done = 0
                deadline = time.perf_counter() + args.duration

                async def worker(url: str = url, make=make, deadline: float = deadline) -> None:
                    nonlocal done
                    while time.perf_counter() < deadline:
                        await one(session, url, headers, make())
                        done += 1

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                rates[name].append(done / (time.perf_counter() - started))
        throughput = {name: {"req_per_s": [round(r) for r in v], "mean": round(sum(v) / len(v))}
                      for name, v in rates.items()}
    return {"c1_ms": c1, f"c{args.concurrency}": throughput}


def round_trips(url: str, n: int = 2000) -> dict:
    """One connection, alternating: what a bare `SELECT 1` and the gateway's limits call each take,
    so the hot-path figures can be read as round trips plus work in Postgres."""
    import uuid

    import psycopg

    from tm_gateway.stages.limits import _TAKE

    times: dict[str, list[float]] = {"select 1": [], "tm_take_limits": [], "release": []}
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            rid = uuid.uuid4()
            for name, sql, params in (
                ("select 1", "SELECT 1", None),
                ("tm_take_limits", _TAKE, (["rpm:key:bench", "tph:agent:bench"], [60, 3600], [10**9, 10**9],
                                           "agent:bench", 10**6, rid, 900)),
                ("release", "DELETE FROM limit_leases WHERE request_id = %s", (rid,)),
            ):
                t = time.perf_counter_ns()
                conn.execute(sql, params)
                times[name].append((time.perf_counter_ns() - t) / 1e6)
    return {name: summary(v[n // 10:]) for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="per target at concurrency 1")
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per target and round of the throughput phase")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from tm_gateway import keys
    from tm_resources import db

    work = Path(tempfile.mkdtemp(prefix="tm-bench-limits-"))
    url = db.start_embedded(work / "home")
    db.migrate(url)
    import psycopg

    with psycopg.connect(url) as conn:
        key, _ = keys.create_key(conn, "bench")
    env = {k: v for k, v in os.environ.items() if k != "TM_CONFIG"}
    env.update(TM_DATABASE_URL=url, PYTHONUNBUFFERED="1")
    children: list[Child] = []
    try:
        up = free_port()
        fake = Child("fake upstream", [sys.executable, "-m", "tests.fakes", "--port", str(up)], env, work / "fake.log")
        children.append(fake)
        wait_http(f"http://127.0.0.1:{up}/health", fake, 30)
        ports = {}
        for name, limits in LIMITS.items():
            port = free_port()
            cfg = work / f"{name}.yaml"
            write_config(cfg, up, port, limits)
            home = work / f"home-{name}"
            gw = Child(f"gateway {name}", [*tm_command(), "gateway", "--config", str(cfg), "--port", str(port)],
                       {**env, "TM_HOME": str(home)}, work / f"{name}.log")
            children.append(gw)
            wait_http(f"http://127.0.0.1:{port}/healthz", gw, 90)
            ports[name] = port
        report = {"machine": machine_info(), "args": vars(args), **asyncio.run(run(args, ports, key)),
                  "round_trip_ms": round_trips(url)}
        print(json.dumps(report, indent=2))
        return 0
    finally:
        for child in reversed(children):
            child.stop(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
