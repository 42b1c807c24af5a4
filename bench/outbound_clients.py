"""Benchmark: what one short whole call costs through each HTTP client the project uses, against a fake
upstream on loopback: aiohttp (the gateway's proxying), httpx (OpenAI-compatible calls off the request
path) and the anthropic SDK (Anthropic calls off the request path; tm_resources/completions.py).

    .venv/bin/python bench/outbound_clients.py [--calls 2000]

The fake runs in its own process (`python -m tests.fakes`); calls are sequential, after a warm-up,
each client keeping its connection alive. Prints p50 / p99 in ms per client and path as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes import free_port  # noqa: E402
from tm_resources.completions import TextClient  # noqa: E402
from tm_resources.providers import Endpoint  # noqa: E402

MESSAGES = [{"role": "user", "content": "Score this answer from 0 to 10."}]


async def timed(call, n: int) -> dict:
    for _ in range(min(200, n)):
        await call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(out, 50)), 3), "p99_ms": round(float(np.percentile(out, 99)), 3)}


async def run(base: str, n: int) -> dict:
    import aiohttp
    import orjson

    from tm_resources import formats as fm

    openai_ep = Endpoint("local", "openai", base + "/v1/chat/completions", (), 5, 30)
    anthropic_ep = Endpoint("anthropic", "anthropic", base + "/v1/messages", ("sk-ant-bench-0123456789",), 5, 30)
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    a_body = fm.openai_request_to_anthropic(body, model="fake-model", default_max_tokens=16)
    a_body.pop("temperature", None)
    figures: dict = {}
    async with aiohttp.ClientSession() as session:
        async def aio_openai():
            async with session.post(openai_ep.url, data=orjson.dumps(body), headers=openai_ep.headers()) as r:
                fm.response_text_openai(orjson.loads(await r.read()))

        async def aio_anthropic():
            async with session.post(anthropic_ep.url, data=orjson.dumps(a_body), headers=anthropic_ep.headers()) as r:
                fm.response_text_anthropic(orjson.loads(await r.read()))

        figures["aiohttp, OpenAI-compatible"] = await timed(aio_openai, n)
        figures["aiohttp, Anthropic"] = await timed(aio_anthropic, n)
    async with TextClient(openai_ep) as httpx_client:
        figures["httpx (TextClient), OpenAI-compatible"] = await timed(
            lambda: httpx_client.complete("fake-model", MESSAGES, 16), n)
    async with TextClient(anthropic_ep) as sdk:
        figures["anthropic SDK (TextClient), Anthropic"] = await timed(
            lambda: sdk.complete("fake-model", MESSAGES, 16), n)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake upstream did not start") from None
                time.sleep(0.1)
        figures = asyncio.run(run(f"http://127.0.0.1:{port}", args.calls))
    finally:
        fake.terminate()
        fake.wait(10)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "calls": args.calls, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
