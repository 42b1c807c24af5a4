"""What the gateway adds over calling the upstream directly, seen from the client, with Postgres logging on.

Starts a fake OpenAI-compatible upstream (`python -m tests.fakes`), nginx passing requests straight through
to it (one worker, keep-alive upstream: the reference for what any HTTP proxy costs here; skipped with a
note when nginx is not installed, or with --no-nginx) and the gateway (`tm gateway`, embedded Postgres in a
fresh TM_HOME) as separate processes, then drives them all from this process with aiohttp:

  phase 1  concurrency 1: warm-up, then --requests per target, the targets taking turns in interleaved
           blocks (the order reversed every other turn, so drift hits all alike): p50/p90/p99 and each
           proxy's added latency over direct;
  phase 2  concurrency --concurrency: --duration seconds per target, in two rounds each, the order
           reversed in the second: requests/s, each proxy as a % of direct, the gateway as a % of nginx;
  --stream the same again with streaming requests (time to first body byte and to the last byte).

--floor adds bench/asgi_floor.py ("floor"): a bare ASGI pass-through on the gateway's own server and
client, the least any gateway on this stack costs, so a run shows how much of the gap to nginx is the
stack's and how much the gateway's own work.

A/B: --ab-ref REF adds a second gateway ("gateway_b") running the code of git ref REF (a temporary
worktree), --ab-env K=V a second gateway of this tree with K=V in its environment; it shares the fake,
the database and the interleaving with the first, so one run compares the two with the machine's drift
cancelled (the figures of two separate runs here differ by up to 20 %).

Every prompt is unique (a counter in the text). At the end the gateway is stopped with SIGINT so it
flushes its log, and the rows in `requests` for the benchmark's key must equal the answers the gateway
gave: `rows logged: X of Y`, exit 1 when they differ or any request failed.

The load generator, the fake upstream, the gateway and Postgres share the machine's cores: compare the
figures of one run with each other, not with another machine's.

    .venv/bin/python bench/gateway_latency.py [--stream] [--requests 2000] [--duration 10] ...
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

try:
    import psutil
except ImportError:  # only for the CPU-per-request figures
    psutil = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench-local"
UPSTREAM_MODEL = "fake-model"  # the fake's default model list
SYSTEM = "You are a terse assistant. Answer in one sentence."
DONE = b"data: [DONE]\n\n"


# -- processes ---------------------------------------------------------------------------------


def _default_signals() -> None:
    # Background shells here may start us with SIGINT/SIGTERM ignored; children inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tm_command() -> list[str]:
    tm = Path(sys.executable).parent / "tm"
    if tm.exists():
        return [str(tm)]
    found = shutil.which("tm")
    return [found] if found else [sys.executable, "-m", "tm_gateway.cli"]


class Child:
    """A process of ours, in its own session, with its output in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_default_signals, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> tuple[bool, float]:
        """Signal, wait; kill the process group if it does not end. (graceful?, seconds taken)"""
        started = time.monotonic()
        graceful = True
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                graceful = False
        if self.alive():
            graceful = False
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()
        return graceful, time.monotonic() - started


def wait_http(url: str, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not answer {url} within {timeout:.0f} s:\n{child.tail()}")
        time.sleep(0.05)


def write_config(path: Path, upstream_port: int, gateway_port: int, cache: bool = True,
                 journal: str = "write") -> None:
    path.write_text(
        "# generated by bench/gateway_latency.py\n"
        f"gateway:\n  host: 127.0.0.1\n  port: {gateway_port}\n"
        f"cache:\n  enabled: {'true' if cache else 'false'}\n"
        f"log:\n  journal: {journal}\n"
        "providers:\n"
        f"  bench:\n    kind: openai\n    base_url: http://127.0.0.1:{upstream_port}/v1\n"
        "models:\n"
        f"  {MODEL}:\n    provider: bench\n    upstream: {UPSTREAM_MODEL}\n    tier: local\n"
        "    price: {input: 0.1, output: 0.2}\n"
        f"defaults:\n  model: {MODEL}\n"
    )


def write_nginx_config(work: Path, upstream_port: int, port: int) -> Path:
    """nginx as a plain pass-through: one worker, keep-alive connections to the upstream, no buffering
    (streams pass as they come), no access log (the gateway's row is its own log, written elsewhere)."""
    for d in ("client_body", "proxy"):
        (work / "nginx" / d).mkdir(parents=True, exist_ok=True)
    conf = work / "nginx" / "nginx.conf"
    conf.write_text(
        "# generated by bench/gateway_latency.py\n"
        + ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\ndaemon off;\npid {work}/nginx/nginx.pid;\nerror_log {work}/nginx/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "  access_log off;\n"
        f"  client_body_temp_path {work}/nginx/client_body;\n  proxy_temp_path {work}/nginx/proxy;\n"
        "  client_max_body_size 16m;\n"
        f"  upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n"
        "    location = /health { return 200 'ok'; }\n"
        "    location / {\n"
        "      proxy_pass http://fake;\n      proxy_http_version 1.1;\n"
        "      proxy_set_header Connection \"\";\n      proxy_buffering off;\n"
        "    }\n  }\n}\n"
    )
    return conf


def stop_embedded(home: Path) -> None:
    """Stop the embedded Postgres this process or a killed gateway left running in `home`."""
    from tm_resources import db

    for server in list(db._embedded.values()):
        try:
            server._cleanup()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
    db._embedded.clear()
    stop_postgres(home)


def postmaster_pid(home: Path) -> int | None:
    try:
        return int((home / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def stop_postgres(home: Path, timeout: float = 15.0) -> None:
    """Fast shutdown of an embedded server left running (a gateway that had to be killed)."""
    pid = postmaster_pid(home)
    if pid is None or psutil is None or not psutil.pid_exists(pid):
        return
    try:
        p = psutil.Process(pid)
        if "postgres" not in p.name():
            return
        p.send_signal(signal.SIGINT)
        p.wait(timeout)
    except (psutil.Error, OSError):
        pass


# -- CPU accounting -----------------------------------------------------------------------------


class Cpu:
    """CPU seconds used by the client, the fake, the gateway and Postgres (postmaster + backends)."""

    def __init__(self, pids: dict[str, int], home: Path | None, trees: dict[str, int] | None = None):
        self.pids = pids
        self.home = home
        self.trees = trees or {}  # a process with its children (nginx: master and worker)

    def _proc(self, pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def snapshot(self) -> dict[str, float]:
        if psutil is None:
            return {}
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        out = {"_busy": busy, "_wall": time.monotonic()}
        out.update({name: self._proc(pid) for name, pid in self.pids.items()})
        for name, pid in self.trees.items():
            try:
                out[name] = self._proc(pid) + sum(self._proc(c.pid) for c in psutil.Process(pid).children(True))
            except psutil.Error:
                out[name] = 0.0
        out["client"] = time.process_time()
        pm = postmaster_pid(self.home) if self.home else None
        if pm is not None:
            total = self._proc(pm)
            try:
                for c in psutil.Process(pm).children(recursive=True):
                    total += self._proc(c.pid)
            except psutil.Error:
                pass
            out["postgres"] = total
        return out

    @staticmethod
    def per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
        """Microseconds of CPU per request, per process (a process's whole use over the interval)."""
        if not n:
            return {}
        return {k: round((after[k] - before[k]) / n * 1e6, 1) for k in after if k in before and k[0] != "_"}

    @staticmethod
    def background(before: dict[str, float], after: dict[str, float]) -> float | None:
        """Cores' worth of CPU used by processes other than ours over the interval (other engineers'
        jobs on a shared machine): above a few tenths, the figures are disturbed."""
        if "_busy" not in before or "_busy" not in after:
            return None
        ours = sum(after[k] - before[k] for k in after if k in before and k[0] != "_")
        wall = after["_wall"] - before["_wall"]
        return round(max(0.0, (after["_busy"] - before["_busy"] - ours) / wall), 2) if wall > 0 else None


# -- load --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    model: str
    headers: dict[str, str]
    answered: int = 0  # HTTP responses received, any status
    failed: int = 0  # transport errors, timeouts, non-200, malformed bodies
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(what)


class Load:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session
        self.counter = 0

    def body(self, model: str, stream: bool) -> bytes:
        self.counter += 1
        i = self.counter
        prompt = (
            f"Request {i}: summarise this note in one sentence. The nightly build on runner {i % 97} took "
            f"{i % 13} minutes longer than usual after the dependency cache was cleared on day {i % 31}."
        )
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "max_tokens": 256,
            "temperature": 0.2,
        }
        if stream:
            body["stream"] = True
        return orjson.dumps(body)

    async def one(self, t: Target, stream: bool) -> tuple[float, float] | None:
        """(time to first body byte, time to last byte) in ms, or None when the request failed."""
        data = self.body(t.model, stream)
        start = time.perf_counter_ns()
        first = 0
        try:
            async with self.session.post(t.url, data=data, headers=t.headers) as resp:
                if stream:
                    chunks = []
                    async for chunk in resp.content.iter_any():
                        if not first:
                            first = time.perf_counter_ns()
                        chunks.append(chunk)
                    end = time.perf_counter_ns()
                    payload = b"".join(chunks)
                else:
                    payload = await resp.read()
                    end = first = time.perf_counter_ns()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as err:
            t.fail(f"{type(err).__name__}: {err}")
            return None
        t.answered += 1
        if status != 200:
            t.fail(f"HTTP {status}: {payload[:200]!r}")
            return None
        if stream and not payload.endswith(DONE) or not stream and b'"choices"' not in payload:
            t.fail(f"unexpected body: {payload[-200:]!r}")
            return None
        return (first - start) / 1e6, (end - start) / 1e6

    async def sequential(self, t: Target, n: int, stream: bool, out: list[tuple[float, float]]) -> None:
        for _ in range(n):
            r = await self.one(t, stream)
            if r is not None:
                out.append(r)

    async def for_duration(self, t: Target, seconds: float, concurrency: int, stream: bool) -> tuple[int, float, list]:
        """Closed loop: `concurrency` workers until the deadline; in-flight requests are finished, never
        cancelled (a cancelled request would leave a 499 row the client never saw)."""
        lat: list[tuple[float, float]] = []
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                r = await self.one(t, stream)
                if r is not None:
                    lat.append(r)
                    done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - started, lat


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    f = int(k)
    c = min(f + 1, len(sorted_vals) - 1)
    return sorted_vals[f] + (sorted_vals[c] - sorted_vals[f]) * (k - f)


def summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {
        "n": len(v),
        "p50": round(pct(v, 0.50), 3),
        "p90": round(pct(v, 0.90), 3),
        "p99": round(pct(v, 0.99), 3),
        "mean": round(sum(v) / len(v), 3) if v else float("nan"),
        "max": round(v[-1], 3) if v else float("nan"),
    }


async def phase1(load: Load, targets: list[Target], args: argparse.Namespace, stream: bool, cpu: Cpu) -> dict:
    """Concurrency 1, blocks of --block requests, the targets taking turns (D N G G N D D N G ...)."""
    block = max(1, args.block)
    direct = targets[0]

    async def interleaved(n: int, sink: dict[str, list]) -> None:
        left = {t.name: n for t in targets}
        k = 0
        while any(left.values()):
            for t in (targets if k % 2 == 0 else targets[::-1]):
                m = min(block, left[t.name])
                if m:
                    await load.sequential(t, m, stream, sink[t.name])
                    left[t.name] -= m
            k += 1

    await interleaved(args.warmup, {t.name: [] for t in targets})
    gc.collect()
    gc.freeze()
    got: dict[str, list[tuple[float, float]]] = {t.name: [] for t in targets}
    before = cpu.snapshot()
    started = time.perf_counter()
    await interleaved(args.requests, got)
    elapsed = time.perf_counter() - started
    after = cpu.snapshot()

    res: dict[str, Any] = {"concurrency": 1, "requests_per_target": args.requests, "warmup_per_target": args.warmup,
                           "block": block, "seconds": round(elapsed, 1), "targets": [t.name for t in targets]}
    total_key = "ttlb_ms" if stream else "latency_ms"
    for t in targets:
        res[t.name] = {total_key: summary([x[1] for x in got[t.name]])}
        if stream:
            res[t.name]["ttfb_ms"] = summary([x[0] for x in got[t.name]])
    for t in targets[1:]:
        for key in ((total_key, "ttfb_ms") if stream else (total_key,)):
            d, g = res[direct.name][key], res[t.name][key]
            added = {q: round(g[q] - d[q], 3) for q in ("p50", "p90", "p99", "mean")}
            res.setdefault("added_ms" if t.name == "gateway" else f"{t.name}_added_ms", {})[key] = added
    # All targets' requests share this interval, so this is CPU per set of one request to each.
    res["cpu_us_per_set"] = cpu.per_request(before, after, args.requests)
    res["background_cores"] = cpu.background(before, after)
    return res


async def phase2(load: Load, targets: list[Target], args: argparse.Namespace, stream: bool, cpu: Cpu) -> dict:
    c = args.concurrency
    rounds = 2
    per_round = args.duration / rounds
    # Warm-up: open the connection pools to full size on every side.
    for t in targets:
        await load.for_duration(t, min(1.0, per_round), c, stream)
    totals = {t.name: {"requests": 0, "seconds": 0.0, "lat": [], "cpu": {}, "bg": []} for t in targets}
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            gc.collect()
            before = cpu.snapshot()
            n, secs, lat = await load.for_duration(t, per_round, c, stream)
            after = cpu.snapshot()
            tot = totals[t.name]
            tot["requests"] += n
            tot["seconds"] += secs
            tot["lat"].extend(lat)
            for k, v in after.items():
                if k in before and k[0] != "_":
                    tot["cpu"][k] = tot["cpu"].get(k, 0.0) + v - before[k]
            bg = cpu.background(before, after)
            if bg is not None:
                tot["bg"].append(bg)
    res: dict[str, Any] = {"concurrency": c, "seconds_per_target": args.duration, "rounds_per_target": rounds,
                           "targets": [t.name for t in targets]}
    for name, tot in totals.items():
        rps = tot["requests"] / tot["seconds"] if tot["seconds"] else 0.0
        key = "ttlb_ms" if stream else "latency_ms"
        res[name] = {
            "requests": tot["requests"],
            "rps": round(rps, 1),
            key: summary([x[1] for x in tot["lat"]]),
            "cpu_us_per_request": {k: round(v / tot["requests"] * 1e6, 1) for k, v in tot["cpu"].items()}
            if tot["requests"] else {},
            "background_cores": max(tot["bg"]) if tot["bg"] else None,
        }

    def share(a: str, b: str) -> float | None:
        return round(100 * res[a]["rps"] / res[b]["rps"], 1) if a in res and b in res and res[b]["rps"] else None

    res["gateway_pct_of_direct"] = share("gateway", "direct")
    if "nginx" in res:
        res["nginx_pct_of_direct"] = share("nginx", "direct")
        res["gateway_pct_of_nginx"] = share("gateway", "nginx")
        if "floor" in res:
            res["floor_pct_of_nginx"] = share("floor", "nginx")
    return res


async def run_load(args: argparse.Namespace, targets: list[Target], cpu: Cpu) -> dict:
    limit = max(2 * args.concurrency, 100)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=60)
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        load = Load(session)
        modes = [False, True] if args.stream else [False]
        for stream in modes:
            label = "stream" if stream else "non_stream"
            print(f"[{label}] phase 1: concurrency 1, {args.warmup} warm-up + {args.requests} measured per target",
                  flush=True)
            p1 = await phase1(load, targets, args, stream, cpu)
            print_phase1(label, p1, stream)
            print(f"[{label}] phase 2: concurrency {args.concurrency}, {args.duration:g} s per target", flush=True)
            p2 = await phase2(load, targets, args, stream, cpu)
            print_phase2(label, p2, stream)
            results[label] = {"c1": p1, f"c{args.concurrency}": p2}
    return results


# -- reporting ---------------------------------------------------------------------------------


def print_phase1(label: str, r: dict, stream: bool) -> None:
    keys = ("ttfb_ms", "ttlb_ms") if stream else ("latency_ms",)
    for key in keys:
        print(f"  {key:<14}      p50      p90      p99     mean")
        for name in r["targets"]:
            s = r[name][key]
            print(f"  {name:<14} {s['p50']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f} {s['mean']:8.3f}")
        for name in r["targets"][1:]:
            a = r["added_ms" if name == "gateway" else f"{name}_added_ms"][key]
            label = f"{name} added"
            print(f"  {label:<14} {a['p50']:8.3f} {a['p90']:8.3f} {a['p99']:8.3f} {a['mean']:8.3f}")
    if r.get("cpu_us_per_set"):
        print(f"  CPU us per set of one request to each target: {r['cpu_us_per_set']}")
    print(f"  ({r['seconds']} s)", flush=True)
    warn_background(r.get("background_cores"))


def print_phase2(label: str, r: dict, stream: bool) -> None:
    key = "ttlb_ms" if stream else "latency_ms"
    for name in r["targets"]:
        s = r[name]
        print(f"  {name:<8} {s['rps']:8.1f} req/s  ({s['requests']} requests)  "
              f"{key} p50 {s[key]['p50']:.3f} p99 {s[key]['p99']:.3f}   CPU us/req {s['cpu_us_per_request']}")
    line = f"  gateway = {r['gateway_pct_of_direct']}% of direct"
    if "nginx" in r:
        line += f"; nginx = {r['nginx_pct_of_direct']}% of direct; gateway = {r['gateway_pct_of_nginx']}% of nginx"
        if "floor_pct_of_nginx" in r:
            line += f"; floor = {r['floor_pct_of_nginx']}% of nginx"
    print(line, flush=True)
    warn_background(max((r[n]["background_cores"] or 0.0) for n in r["targets"]))


BACKGROUND_WARN = 0.25


def warn_background(cores: float | None) -> None:
    if cores is not None and cores > BACKGROUND_WARN:
        print(f"  WARNING: other processes used {cores:.2f} cores during this phase: the figures are disturbed; "
              "run again on a quiet machine", flush=True)


def headline(report: dict, c: int) -> dict:
    """The figures docs/benchmarks.md quotes, in one flat mapping."""
    out: dict[str, Any] = {}
    for label, key in (("non_stream", "latency_ms"), ("stream", "ttlb_ms")):
        r = report.get(label)
        if not r:
            continue
        added = r["c1"]["added_ms"]
        out[f"{label}_c1_added_p50_ms"] = added[key]["p50"]
        out[f"{label}_c1_added_p99_ms"] = added[key]["p99"]
        if label == "stream":
            out["stream_c1_ttfb_added_p50_ms"] = added["ttfb_ms"]["p50"]
            out["stream_c1_ttfb_added_p99_ms"] = added["ttfb_ms"]["p99"]
        if "floor_added_ms" in r["c1"]:
            out[f"{label}_c1_floor_added_p50_ms"] = r["c1"]["floor_added_ms"][key]["p50"]
            out[f"{label}_c{c}_floor_pct_of_nginx"] = r[f"c{c}"].get("floor_pct_of_nginx")
        if "nginx_added_ms" in r["c1"]:
            out[f"{label}_c1_nginx_added_p50_ms"] = r["c1"]["nginx_added_ms"][key]["p50"]
            out[f"{label}_c1_gateway_minus_nginx_p50_ms"] = round(
                added[key]["p50"] - r["c1"]["nginx_added_ms"][key]["p50"], 3)
        p2 = r[f"c{c}"]
        out[f"{label}_c{c}_gateway_pct_of_direct"] = p2["gateway_pct_of_direct"]
        if "gateway_pct_of_nginx" in p2:
            out[f"{label}_c{c}_gateway_pct_of_nginx"] = p2["gateway_pct_of_nginx"]
        out[f"{label}_c{c}_rps"] = {n: p2[n]["rps"] for n in p2["targets"]}
        if "gateway_b" in p2["targets"]:
            out[f"{label}_c1_b_minus_a_p50_ms"] = round(
                r["c1"]["gateway_b_added_ms"][key]["p50"] - added[key]["p50"], 3)
            out[f"{label}_c{c}_b_pct_of_a"] = round(100 * p2["gateway_b"]["rps"] / p2["gateway"]["rps"], 1)
            out[f"{label}_c{c}_cpu_us_a_b"] = [p2["gateway"]["cpu_us_per_request"].get("gateway"),
                                                p2["gateway_b"]["cpu_us_per_request"].get("gateway_b")]
    rows = report.get("rows", {})
    out["rows_logged"] = f"{rows.get('logged')} of {rows.get('gateway_answered')}"
    return out


def machine_info() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("aiohttp", "uvicorn", "starlette", "uvloop", "httptools", "psycopg", "orjson"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001
            pass
    commit = None
    dirty = None
    try:  # read-only git calls: which code was measured
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per target at concurrency 1")
    p.add_argument("--warmup", type=int, default=200, help="warm-up requests per target at concurrency 1")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds per target at --concurrency, split into two rounds each")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    p.add_argument("--block", type=int, default=100, help="requests per interleaved block at concurrency 1")
    p.add_argument("--stream", action="store_true", help="also measure streaming requests")
    p.add_argument("--no-cache", action="store_true",
                   help="turn the response cache off (on: every request, all unique, pays an exact-cache lookup)")
    p.add_argument("--journal", choices=("off", "write", "fsync"), default="write",
                   help="log.journal: each row appended to a local file before it is queued (default write)")
    p.add_argument("--database-url", help="log to this Postgres instead of an embedded one in a temp TM_HOME")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (TM_HOME, config, process logs)")
    p.add_argument("--no-nginx", action="store_true", help="leave nginx's reference line out")
    p.add_argument("--floor", action="store_true",
                   help="also measure bench/asgi_floor.py: a bare ASGI pass-through on the gateway's server and client")
    p.add_argument("--ab-ref", help="also measure a gateway running this git ref's code (as gateway_b)")
    p.add_argument("--ab-env", action="append", default=[], metavar="K=V",
                   help="also measure a gateway of this tree with K=V in its environment (as gateway_b)")
    return p.parse_args(argv)


def create_key(tm: list[str], env: dict[str, str], user: str) -> tuple[str, str]:
    """(key, key id) of a new key for `user`."""
    out = subprocess.run([*tm, "keys", "create", "--user", user], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, preexec_fn=_default_signals)
    if out.returncode != 0:
        raise RuntimeError(f"tm keys create failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    key = next((ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("tm-")), None)
    key_id = re.search(r"\(id (k_[0-9a-f]+)\)", out.stdout)
    if key is None or key_id is None:
        raise RuntimeError(f"no key in the output of tm keys create:\n{out.stdout}")
    return key, key_id.group(1)


def ab_command(args: argparse.Namespace, work: Path, env: dict[str, str],
               tm: list[str]) -> tuple[list[str], dict, Path]:
    """The second gateway's command, environment and working folder (--ab-ref: a worktree of the ref)."""
    env_b = dict(env)
    for kv in args.ab_env:
        k, _, v = kv.partition("=")
        env_b[k] = v
    if not args.ab_ref:
        return tm, env_b, REPO
    tree = work / "ab-tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.ab_ref], cwd=REPO, check=True,
                   timeout=60)
    env_b["PYTHONPATH"] = str(tree)  # ahead of the editable install of this tree
    return [sys.executable, "-m", "tm_gateway.cli"], env_b, tree


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # So that Ctrl-C and SIGTERM reach the finally below even when we were started with them ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    work = Path(tempfile.mkdtemp(prefix="tm-bench-"))
    home = work / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TM_DATABASE_URL", "TM_CONFIG")}
    env["TM_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    if args.database_url:
        env["TM_DATABASE_URL"] = args.database_url
    os.environ.pop("TM_DATABASE_URL", None)

    fake: Child | None = None
    gw: Child | None = None
    gw_b: Child | None = None
    floor: Child | None = None
    nginx: Child | None = None
    report: dict[str, Any] = {"command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
                              "machine": machine_info()}
    ok = True
    interrupted = False
    t0 = time.monotonic()
    try:
        up_port, gw_port = free_port(), free_port()
        fake = Child("fake upstream", [sys.executable, "-m", "tests.fakes", "--port", str(up_port)], env,
                     work / "fake.log")
        wait_http(f"http://127.0.0.1:{up_port}/health", fake, 30)

        nginx_bin = None if args.no_nginx else shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
        if nginx_bin:
            nginx_port = free_port()
            conf = write_nginx_config(work, up_port, nginx_port)
            nginx = Child("nginx", [nginx_bin, "-p", str(work / "nginx"), "-c", str(conf)], env, work / "nginx.log")
            wait_http(f"http://127.0.0.1:{nginx_port}/health", nginx, 30)
        elif not args.no_nginx:
            print("nginx is not installed (apt-get install nginx-light): no reference line this run", flush=True)

        floor = None
        if args.floor:
            floor_port = free_port()
            floor = Child("floor", [sys.executable, "-m", "uvicorn", "bench.asgi_floor:app", "--loop", "uvloop",
                                    "--http", "httptools", "--no-access-log", "--log-level", "warning",
                                    "--host", "127.0.0.1", "--port", str(floor_port)],
                          {**env, "UPSTREAM": f"http://127.0.0.1:{up_port}/v1/chat/completions",
                           "MODEL": UPSTREAM_MODEL}, work / "floor.log")
            wait_http(f"http://127.0.0.1:{floor_port}/health", floor, 30)

        cfg = work / "bench.yaml"
        write_config(cfg, up_port, gw_port, cache=not args.no_cache, journal=args.journal)
        tm = tm_command()
        key, key_id = create_key(tm, env, "bench")

        gw = Child("gateway", [*tm, "gateway", "--config", str(cfg), "--port", str(gw_port),
                               "--workers", str(args.workers)], env, work / "gateway.log")
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", gw, 90)
        if args.ab_ref or args.ab_env:
            key_b, key_id_b = create_key(tm, env, "bench-b")
            tm_b, env_b, cwd_b = ab_command(args, work, env, tm)
            gw_b_port = free_port()
            gw_b = Child("gateway_b", [*tm_b, "gateway", "--config", str(cfg), "--port", str(gw_b_port),
                                       "--workers", str(args.workers)], env_b, work / "gateway_b.log", cwd=cwd_b)
            wait_http(f"http://127.0.0.1:{gw_b_port}/healthz", gw_b, 90)
            print(f"gateway_b pid {gw_b.pid} on :{gw_b_port}: "
                  + (f"ref {args.ab_ref}" if args.ab_ref else "this tree") + (f", env {args.ab_env}" if args.ab_env
                                                                               else ""), flush=True)
        print(f"fake upstream pid {fake.pid} on :{up_port}; gateway pid {gw.pid} on :{gw_port}; "
              f"TM_HOME {home}; ready after {time.monotonic() - t0:.1f} s", flush=True)

        auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        direct = Target("direct", f"http://127.0.0.1:{up_port}/v1/chat/completions", UPSTREAM_MODEL, auth)
        gateway = Target("gateway", f"http://127.0.0.1:{gw_port}/v1/chat/completions", MODEL, auth)
        targets = [direct, gateway]
        pids = {"fake": fake.pid, "gateway": gw.pid}
        if gw_b is not None:
            gateway_b = Target("gateway_b", f"http://127.0.0.1:{gw_b_port}/v1/chat/completions", MODEL,
                               {**auth, "authorization": f"Bearer {key_b}"})
            targets.append(gateway_b)
            pids["gateway_b"] = gw_b.pid
        trees = {}
        if floor is not None:
            targets.insert(1, Target("floor", f"http://127.0.0.1:{floor_port}/v1/chat/completions", UPSTREAM_MODEL,
                                     auth))
            pids["floor"] = floor.pid
        if nginx is not None:
            targets.insert(1, Target("nginx", f"http://127.0.0.1:{nginx_port}/v1/chat/completions", UPSTREAM_MODEL,
                                     auth))
            trees["nginx"] = nginx.pid
        cpu = Cpu(pids, None if args.database_url else home, trees)

        try:
            import uvloop

            report["client_loop"] = "uvloop"
            results = uvloop.run(run_load(args, targets, cpu))
        except ImportError:
            report["client_loop"] = "asyncio"
            results = asyncio.run(run_load(args, targets, cpu))
        report.update(results)

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw_port}/healthz", timeout=5) as r:
                report["gateway_healthz_before_stop"] = json.loads(r.read())
        except (urllib.error.URLError, OSError):
            pass
        if gw_b is not None:
            gw_b.stop(signal.SIGINT)
        graceful, secs = gw.stop(signal.SIGINT)
        report["gateway_stop"] = {"graceful": graceful, "seconds": round(secs, 2), "returncode": gw.proc.returncode}
        if not graceful:
            print(f"gateway did not stop on SIGINT within the timeout; killed:\n{gw.tail()}", flush=True)
            ok = False

        # Count the rows with the gateway gone: whatever it accepted is in Postgres (or in its spool) now.
        import psycopg

        if args.database_url:
            url = args.database_url
        else:
            import warnings

            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # platformdirs, via pgserver
            from tm_resources import db

            url = db.database_url(home)
        with psycopg.connect(url) as conn:
            by_status = dict(conn.execute(
                "SELECT status, count(*) FROM requests WHERE api_key_id = %s GROUP BY status", (key_id,)
            ).fetchall())
            if gw_b is not None:
                logged_b = conn.execute("SELECT count(*) FROM requests WHERE api_key_id = %s",
                                        (key_id_b,)).fetchone()[0]
                report["rows_b"] = {"logged": logged_b, "gateway_answered": gateway_b.answered}
                print(f"gateway_b rows logged: {logged_b} of {gateway_b.answered}", flush=True)
                ok = ok and logged_b == gateway_b.answered
        logged = sum(by_status.values())
        answered = gateway.answered
        spooled = sorted(p.name for p in (home / "spool").glob("*.jsonl")) if (home / "spool").exists() else []
        report["rows"] = {"logged": logged, "gateway_answered": answered, "by_status": by_status,
                          "spool_files": spooled}
        report["failures"] = {t.name: {"failed": t.failed, "examples": t.failures} for t in targets}
        report["seconds_total"] = round(time.monotonic() - t0, 1)

        print(f"rows logged: {logged} of {answered}" + ("" if logged == answered else "   <-- MISMATCH"), flush=True)
        if logged != answered:
            ok = False
            print(f"rows by status: {by_status}; spool files: {spooled}", flush=True)
        for t in targets:
            if t.failed:
                ok = False
                print(f"{t.name}: {t.failed} failed requests, e.g. {t.failures}", flush=True)
        report["headline"] = headline(report, args.concurrency)
        print("headline: " + json.dumps(report["headline"]))
        print("--- JSON ---")
        print(json.dumps(report, indent=2, default=str))
        print("--- end JSON ---", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        ok = False
        interrupted = True
    except Exception as err:  # noqa: BLE001 - report, clean up, exit 1
        print(f"benchmark failed: {type(err).__name__}: {err}", file=sys.stderr)
        ok = False
    finally:
        for child, sig in ((gw_b, signal.SIGINT), (gw, signal.SIGINT), (floor, signal.SIGTERM), (nginx, signal.SIGQUIT),
                           (fake, signal.SIGTERM)):
            if child is not None and child.alive():
                child.stop(sig, timeout=20)
        if not args.database_url:
            # Only left running when the gateway had to be killed, or when we started it to count.
            stop_embedded(home)
        if (work / "ab-tree").exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "ab-tree")], cwd=REPO, timeout=60,
                           capture_output=True)
        if args.keep or not (ok or interrupted):
            print(f"kept {work} (config, TM_HOME, fake.log, gateway.log, nginx/)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
