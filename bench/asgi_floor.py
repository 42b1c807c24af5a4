"""The least a Python gateway on this stack can cost: a bare ASGI pass-through (no Starlette, no auth, no
routing, no log) on the gateway's own server and client (uvicorn with httptools and uvloop, one aiohttp
session with the gateway's pool settings and no cookie jar), as bench/gateway_latency.py --floor runs it.

It reads the body, swaps the model name, posts it upstream and answers the upstream's body: what is left
of the gateway's cost once everything it does is removed. The gap from this line to nginx's is the
stack's; the gap from the gateway's to this one is the gateway's own work.

    UPSTREAM=http://127.0.0.1:PORT/v1/chat/completions MODEL=fake-model \\
        .venv/bin/python -m uvicorn bench.asgi_floor:app --loop uvloop --http httptools --port N
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import orjson

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000/v1/chat/completions")
MODEL = os.environ.get("MODEL", "fake-model")
_session: aiohttp.ClientSession | None = None
_JSON = [(b"content-type", b"application/json")]


async def app(scope: dict, receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, ttl_dns_cache=300)
                _session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    request = orjson.loads(body)
    request["model"] = MODEL
    assert _session is not None
    async with _session.post(UPSTREAM, data=orjson.dumps(request), headers={"content-type": "application/json"}) as r:
        status, data = r.status, await r.read()
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": data})
