"""Faults under load, loopback only: does every answered request leave exactly one row?

Starts an embedded Postgres (owned by this script, so it can stop and restart it), a fake
OpenAI-compatible upstream (`python -m tests.fakes`) and the gateway (`tm gateway`, its database
given by TM_DATABASE_URL), then runs each scenario with its own API key:

  steady      closed-loop load with repeated bodies (so the cache path is hot), no fault
  pg-restart  Postgres stopped (fast shutdown) a third of the way in, started again --outage s later
  sigterm     the gateway sent SIGTERM halfway (it should drain and flush), load continues to the end
  kill9       the gateway killed with SIGKILL halfway, then started again on the same TM_HOME (its
              start replays what the dead process journaled)

Each prints sent (requests tried) / answered (responses with a request id) / rows (those ids found
in `requests`) / lost (answered, no row) / duplicated (ids stored twice) / extra (rows the client
never saw answered: requests cut off in flight). Bounded: --duration seconds of load per scenario,
at most --max-requests each, and at most --settle s waiting for rows to arrive.

    .venv/bin/python bench/chaos.py [--scenarios steady,pg-restart,sigterm,kill9] [--journal write|off]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psycopg

from gateway_latency import REPO, Child, _default_signals, free_port, tm_command, wait_http, write_config

SCENARIOS = ("steady", "pg-restart", "sigterm", "kill9")
PROMPTS = 40  # distinct bodies the load repeats


@dataclass
class Tally:
    sent: int = 0
    answered_ids: set[str] = field(default_factory=set)
    by_status: dict[int, int] = field(default_factory=dict)
    errors: int = 0


async def load(url: str, key: str, seconds: float, concurrency: int, max_requests: int, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    bodies = [orjson.dumps({"model": "bench-local", "max_tokens": 32,
                            "messages": [{"role": "user", "content": f"chaos prompt number {i}"}]})
              for i in range(PROMPTS)]
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            while time.monotonic() < deadline and tally.sent < max_requests:
                body = bodies[tally.sent % PROMPTS]
                tally.sent += 1
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        rid = resp.headers.get("x-tm-request-id")
                        tally.by_status[resp.status] = tally.by_status.get(resp.status, 0) + 1
                        if rid:
                            tally.answered_ids.add(rid)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    tally.errors += 1
                    await asyncio.sleep(0.05)  # a gateway that is down: do not spin

        await asyncio.gather(*(worker() for _ in range(concurrency)))


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.home = work / "home"
        self.home.mkdir()
        from tm_resources import db

        self.db = db
        self.url = db.start_embedded(self.home)
        db.migrate(self.url)
        self.env = {k: v for k, v in os.environ.items() if k != "TM_CONFIG"}
        self.env.update({"TM_HOME": str(self.home), "TM_DATABASE_URL": self.url, "PYTHONUNBUFFERED": "1"})
        self.up_port, self.gw_port = free_port(), free_port()
        self.fake = Child("fake upstream", [sys.executable, "-m", "tests.fakes", "--port", str(self.up_port)],
                          self.env, work / "fake.log")
        wait_http(f"http://127.0.0.1:{self.up_port}/health", self.fake, 30)
        self.cfg = work / "chaos.yaml"
        write_config(self.cfg, self.up_port, self.gw_port, cache=True, journal=args.journal)
        self.gateways = 0

    def key(self, user: str) -> tuple[str, str]:
        out = subprocess.run([*tm_command(), "keys", "create", "--user", user], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=120, preexec_fn=_default_signals)
        key = next(ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("tm-"))
        return key, re.search(r"\(id (k_[0-9a-f]+)\)", out.stdout).group(1)

    def gateway(self) -> Child:
        self.gateways += 1
        gw = Child("gateway", [*tm_command(), "gateway", "--config", str(self.cfg), "--port", str(self.gw_port)],
                   self.env, self.work / f"gateway-{self.gateways}.log")
        wait_http(f"http://127.0.0.1:{self.gw_port}/healthz", gw, 120)
        return gw

    def stop_postgres(self) -> None:
        for server in list(self.db._embedded.values()):
            server._cleanup()  # type: ignore[attr-defined]  (pg_ctl stop, fast)
        self.db._embedded.clear()

    def start_postgres(self) -> None:
        self.db.start_embedded(self.home)

    def rows(self, key_id: str) -> tuple[set[str], int]:
        with psycopg.connect(self.url) as conn:
            ids = [str(i) for (i,) in conn.execute("SELECT id FROM requests WHERE api_key_id = %s", (key_id,))]
        return set(ids), len(ids)

    def settle(self, key_id: str, answered: set[str]) -> tuple[set[str], int]:
        """Wait (bounded) for the answered ids to arrive: spools replay every few seconds."""
        deadline = time.monotonic() + self.args.settle
        while True:
            ids, n = self.rows(key_id)
            if answered <= ids or time.monotonic() > deadline:
                return ids, n
            time.sleep(0.5)

    def run(self, scenario: str) -> dict:
        args = self.args
        key, key_id = self.key(f"chaos-{scenario}")
        gw = self.gateway()
        tally = Tally()
        url = f"http://127.0.0.1:{self.gw_port}/v1/chat/completions"

        async def drive() -> None:
            task = asyncio.create_task(load(url, key, args.duration, args.concurrency, args.max_requests, tally))
            if scenario == "pg-restart":
                await asyncio.sleep(args.duration / 3)
                await asyncio.to_thread(self.stop_postgres)
                await asyncio.sleep(args.outage)
                await asyncio.to_thread(self.start_postgres)
            elif scenario == "sigterm":
                await asyncio.sleep(args.duration / 2)
                gw.proc.send_signal(signal.SIGTERM)
            elif scenario == "kill9":
                await asyncio.sleep(args.duration / 2)
                gw.proc.send_signal(signal.SIGKILL)
            await task

        started = time.monotonic()
        asyncio.run(drive())
        restarted = None
        if scenario == "kill9":
            gw.proc.wait(10)
            gw.stop()
            restarted = gw = self.gateway()  # its start recovers the dead process's journal
        graceful, _ = gw.stop(signal.SIGTERM, timeout=60)
        ids, n = self.settle(key_id, tally.answered_ids)
        result = {
            "scenario": scenario, "sent": tally.sent, "answered": len(tally.answered_ids), "rows": n,
            "lost": len(tally.answered_ids - ids), "duplicated": n - len(ids), "extra": len(ids - tally.answered_ids),
            "errors": tally.errors, "by_status": dict(sorted(tally.by_status.items())),
            "gateway_stopped_cleanly": graceful, "seconds": round(time.monotonic() - started, 1),
        }
        if restarted is not None:
            result["restarted"] = True
        return result

    def close(self) -> None:
        self.fake.stop(signal.SIGTERM, timeout=20)
        self.stop_postgres()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per scenario")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--max-requests", type=int, default=20_000, help="at most this many requests per scenario")
    p.add_argument("--outage", type=float, default=3.0, help="seconds Postgres stays down in pg-restart")
    p.add_argument("--settle", type=float, default=60.0, help="at most this long to wait for rows to arrive")
    p.add_argument("--journal", choices=("off", "write", "fsync"), default="write", help="the gateway's log.journal")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (TM_HOME, config, process logs)")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(SCENARIOS):
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    work = Path(tempfile.mkdtemp(prefix="tm-chaos-"))
    bench = None
    ok = True
    try:
        bench = Bench(args, work)
        print(f"{'scenario':<11} {'sent':>6} {'answered':>8} {'rows':>6} {'lost':>5} {'dup':>4} {'extra':>5}"
              f" {'errors':>6}  statuses", flush=True)
        for s in scenarios:
            r = bench.run(s)
            print(f"{r['scenario']:<11} {r['sent']:>6} {r['answered']:>8} {r['rows']:>6} {r['lost']:>5}"
                  f" {r['duplicated']:>4} {r['extra']:>5} {r['errors']:>6}  {r['by_status']}", flush=True)
            ok = ok and r["lost"] == 0 and r["duplicated"] == 0
    finally:
        if bench is not None:
            bench.close()
        if args.keep or not ok:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
