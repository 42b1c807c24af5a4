"""A fake PostHog capture endpoint that records what the official SDK sent."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
import uuid
import zlib
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from tests.fakes.server import Recorded, _json_response, _ThreadedServer

_PH_EVENT_PATHS = {"/batch", "/capture", "/e", "/i/v0/e", "/i/v0/ai/batch", "/track", "/engage",
                   "/i/v1/analytics/events"}


class FakePostHog(_ThreadedServer):
    """A PostHog capture endpoint on 127.0.0.1 that records what the official SDK really sent."""

    _name = "fake-posthog"

    def __init__(self, *, port: int = 0) -> None:
        super().__init__(port)
        self.events: list[dict] = []
        self.requests: list[Recorded] = []  # every request, including flags/unknown paths
        self._cond = threading.Condition()

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def reset(self) -> None:
        with self._cond:
            self.events.clear()
            self.requests.clear()

    def wait_for(self, n: int, timeout: float = 5) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.events) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"FakePostHog got {len(self.events)} events, wanted {n}: "
                                       f"{[e.get('event') for e in self.events]}")
                self._cond.wait(left)
            return list(self.events)

    @staticmethod
    def _decode(request: web.Request, raw: bytes) -> Any:
        # aiohttp already inflates bodies sent with Content-Encoding, so sniff the
        # magic bytes instead of trusting the header (posthog-js-style
        # ?compression=gzip-js bodies arrive still compressed).
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:1] == b"\x78" and request.headers.get("content-encoding", "").lower() == "deflate":
            raw = zlib.decompress(raw)
        if not raw:
            return None
        if request.content_type == "application/x-www-form-urlencoded":
            data = parse_qs(raw.decode()).get("data", [""])[0]
            try:
                return json.loads(data)
            except ValueError:
                return json.loads(base64.b64decode(data + "=" * (-len(data) % 4)))
        return json.loads(raw)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read() if request.can_read_body else b""
        path = request.path.rstrip("/") or "/"
        try:
            payload = self._decode(request, raw)
        except Exception:
            payload = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._cond:
            self.requests.append(Recorded(request.path, headers, payload if isinstance(payload, dict) else None))

        if path in _PH_EVENT_PATHS and request.method == "POST":
            if payload is None:
                return _json_response({"type": "validation_error", "code": "invalid_payload",
                                       "detail": "Malformed request data"}, 400)
            events = self._events_of(payload, request)
            with self._cond:
                self.events.extend(events)
                self._cond.notify_all()
            if path == "/i/v1/analytics/events":
                return _json_response({"results": {e.get("uuid", ""): {"result": "ok"} for e in events}})
            return _json_response({"status": 1})
        if path in ("/flags", "/decide"):
            return _json_response({"flags": {}, "featureFlags": {}, "featureFlagPayloads": {},
                                   "errorsWhileComputingFlags": False, "quotaLimited": [],
                                   "requestId": str(uuid.uuid4())})
        if path in ("/flags/definitions", "/api/feature_flag/local_evaluation"):
            return _json_response({"flags": [], "group_type_mapping": {}, "cohorts": {}})
        return _json_response({})

    @staticmethod
    def _events_of(payload: Any, request: web.Request) -> list[dict]:
        api_key = None
        if isinstance(payload, dict):
            api_key = payload.get("api_key") or payload.get("token")
            items = payload.get("batch") if "batch" in payload else [payload]
        else:
            items = payload
        if api_key is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                api_key = auth[7:].strip()
        out = []
        for item in items or ():
            if isinstance(item, dict):
                event = dict(item)
                event.setdefault("properties", {})
                if api_key is not None:
                    event.setdefault("api_key", api_key)  # lets tests assert which project key was used
                out.append(event)
        return out
