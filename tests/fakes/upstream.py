"""FakeUpstream: one server speaking the Anthropic and OpenAI APIs, with failure injection for the gateway's tests."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.anthropic import AnthropicRoutes, _anthropic_error
from tests.fakes.openai import OpenAIRoutes, _openai_error, _openai_text
from tests.fakes.server import Recorded, Responder, ToolCall, _json_response, _ThreadedServer


def _last_user_text(fmt: str, body: dict) -> str:
    for msg in reversed(body.get("messages") or ()):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if fmt == "openai":
                return _openai_text(content)
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
            return ""
    return ""


def echo_responder(fmt: str, body: dict) -> str:
    return "echo: " + _last_user_text(fmt, body)



# ---------------------------------------------------------------- failure injection


@dataclass
class _Rule:
    kind: str  # "fail" | "stall" | "drop" | "cut_body" | "garble" | "bad_event"
    times: int
    model: str | None
    status: int = 0
    retry_after: float | None = None
    message: str | None = None
    seconds: float = 0.0
    after_chunks: int = 1
    raw: bytes = b""
    content_type: str = "application/json"


# ---------------------------------------------------------------- FakeUpstream


class FakeUpstream(AnthropicRoutes, OpenAIRoutes, _ThreadedServer):
    """One aiohttp server on 127.0.0.1 serving both the Anthropic Messages API and the OpenAI Chat Completions API."""

    _name = "fake-upstream"

    def __init__(self, *, responder: Responder | None = None, api_keys: set[str] | None = None, port: int = 0,
                 chunk_delay: float = 0.0, words_per_chunk: int = 1, models: list[str] | None = None,
                 record: bool = True) -> None:
        super().__init__(port)
        self.responder: Responder = responder or echo_responder
        self.api_keys = set(api_keys) if api_keys is not None else None
        self.chunk_delay = chunk_delay
        self.words_per_chunk = max(1, int(words_per_chunk))
        self.models: list[str] = list(models) if models is not None else ["fake-model"]
        self.max_context: int | None = None
        self.requests: list[Recorded] = []
        # Off for long benchmark runs, where keeping every request would grow without bound.
        self.record = record
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._seen_models: dict[str, None] = {}
        self._cache_prefixes: set[str] = set()

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    # -- failure injection

    def fail(self, status: int, *, times: int = 1, model: str | None = None, retry_after: float | None = None,
             message: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("fail", times, model, status=status, retry_after=retry_after, message=message))

    def stall(self, seconds: float, *, times: int = 1, model: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("stall", times, model, seconds=seconds))

    def drop(self, *, times: int = 1, model: str | None = None, after_chunks: int = 1) -> None:
        with self._lock:
            self._rules.append(_Rule("drop", times, model, after_chunks=after_chunks))

    def cut_body(self, *, times: int = 1, model: str | None = None) -> None:
        """Whole answers: the headers and half the body, then the connection closes. Streams are answered."""
        with self._lock:
            self._rules.append(_Rule("cut_body", times, model))

    def garble(self, raw: bytes, *, content_type: str = "application/json", times: int = 1,
               model: str | None = None) -> None:
        """Answer 200 with `raw` as the whole body (JSON of the wrong shape, an HTML page, broken JSON),
        streaming requests included."""
        with self._lock:
            self._rules.append(_Rule("garble", times, model, raw=raw, content_type=content_type))

    def bad_event(self, line: bytes, *, times: int = 1, model: str | None = None, after_chunks: int = 1) -> None:
        """In a streamed answer, send `line` (say b"data: {this is not json") after `after_chunks` deltas,
        then carry on as if nothing happened."""
        with self._lock:
            self._rules.append(_Rule("bad_event", times, model, raw=line, after_chunks=after_chunks))

    def reset(self) -> None:
        """Clear injected failures, recorded requests, the prompt cache and the models seen."""
        with self._lock:
            self._rules.clear()
            self.requests.clear()
            self._cache_prefixes.clear()
            self._seen_models.clear()

    def _take(self, kinds: tuple[str, ...], model: str) -> _Rule | None:
        if not self._rules:  # lock-free fast path for the benchmark
            return None
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.kind in kinds and (rule.model is None or rule.model == model):
                    rule.times -= 1
                    if rule.times <= 0:
                        del self._rules[i]
                    return rule
        return None

    async def _inject(self, model: str) -> _Rule | None:
        stall = self._take(("stall",), model)
        if stall is not None:
            await asyncio.sleep(stall.seconds)
        return self._take(("fail", "drop", "cut_body", "garble", "bad_event"), model)

    # -- plumbing

    async def _meet_fault(self, request: web.Request, model: str, stream: bool,
                          error: Callable[..., web.Response]) -> tuple[web.Response | None, _Rule | None, bool]:
        """The injected fault for this request: a reply to send at once, or else the rule the stream meets and
        whether to cut the whole answer's body halfway."""
        rule = await self._inject(model)
        if rule is not None and rule.kind == "fail":
            return error(rule.status, rule.message, retry_after=rule.retry_after), None, False
        if rule is not None and rule.kind == "garble":
            return web.Response(body=rule.raw, status=200, content_type=rule.content_type), None, False
        if rule is not None and rule.kind == "bad_event" and not stream:
            rule = None
        half = rule is not None and rule.kind == "cut_body"
        if half:
            rule = None
        if rule is not None and not stream:
            self._abort(request)
            return web.Response(), None, False
        return None, rule, half

    async def _record(self, request: web.Request) -> dict | None:
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            body = parsed if isinstance(parsed, dict) else None
        if self.record:
            rec = Recorded(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
            with self._lock:
                self.requests.append(rec)
        return body

    def _authorized(self, request: web.Request, *, allow_x_api_key: bool, allow_bearer: bool) -> tuple[bool, str | None]:
        if self.api_keys is None:
            return True, None
        key = request.headers.get("x-api-key") if allow_x_api_key else None
        if key is None and allow_bearer:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
        return key in self.api_keys, key

    def _see_model(self, model: str) -> None:
        if model not in self._seen_models:
            self._seen_models[model] = None

    def _answer(self, fmt: str, body: dict) -> str | ToolCall:
        answer = self.responder(fmt, body)
        if not isinstance(answer, (str, ToolCall)):
            raise TypeError(f"responder must return str or ToolCall, got {type(answer).__name__}")
        return answer

    @staticmethod
    def _abort(request: web.Request) -> None:
        # close() (not abort()) so whatever was already written is flushed first;
        # aiohttp then fails to write the terminator and treats it as a client
        # disconnect, which it logs only at debug level.
        transport = request.transport
        if transport is not None:
            transport.close()

    async def _half(self, request: web.Request, whole: web.Response) -> web.StreamResponse:
        body = whole.body
        assert isinstance(body, bytes)
        resp = web.StreamResponse(status=whole.status, headers=whole.headers)
        resp.content_length = len(body)  # promised whole, so the cut is visible to the reader
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        self._abort(request)
        return resp

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self._anthropic_count_tokens)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        await self._record(request)
        return _json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        anthropic_style = "anthropic-version" in request.headers or "x-api-key" in request.headers
        ok, key = self._authorized(request, allow_x_api_key=True, allow_bearer=True)
        if not ok:
            if anthropic_style:
                return _anthropic_error(401, "invalid x-api-key" if key else "x-api-key header is required")
            return _openai_error(401, f"Incorrect API key provided: {key}." if key else
                                 "You didn't provide an API key.")
        ids = list(dict.fromkeys([*self.models, *self._seen_models]))
        if anthropic_style:
            data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in ids]
            return _json_response({"data": data, "has_more": False, "first_id": ids[0] if ids else None,
                                   "last_id": ids[-1] if ids else None})
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in ids]
        return _json_response({"object": "list", "data": data})


    async def _stream(self, request: web.Request, headers: dict[str, str], preamble: bytes, deltas: list[bytes],
                      epilogue: bytes, drop: _Rule | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        await resp.prepare(request)
        delay = self.chunk_delay
        if drop is not None and drop.kind == "bad_event":
            at = min(drop.after_chunks, len(deltas))
            deltas = [*deltas[:at], drop.raw.rstrip(b"\n") + b"\n\n", *deltas[at:]]
            drop = None
        if drop is None and not delay:
            # One write: nothing to pace, and it keeps the "direct" baseline cheap.
            await resp.write(preamble + b"".join(deltas) + epilogue)
            await resp.write_eof()
            return resp
        await resp.write(preamble)
        if drop is not None and drop.after_chunks <= 0:
            self._abort(request)
            return resp
        for i, chunk in enumerate(deltas):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(chunk)
            if drop is not None and i + 1 >= drop.after_chunks:
                self._abort(request)
                return resp
        if drop is not None:
            self._abort(request)
            return resp
        await resp.write(epilogue)
        await resp.write_eof()
        return resp



FAULTS = ("500", "503", "429", "stall", "stall-mid", "cut", "cut-body", "wrong-shape", "html", "bad-json",
          "bad-event")
_FOREVER = 1 << 62


def inject_fault(fake: FakeUpstream, fault: str, *, model: str | None = None, retry_after: float = 1.0,
                 stall: float = 5.0) -> None:
    """Make every request (for `model`, if given) meet `fault`, for as long as the fake runs."""
    kw: dict[str, Any] = {"times": _FOREVER, "model": model}
    if fault in ("500", "503", "429"):
        fake.fail(int(fault), retry_after=retry_after if fault == "429" else None, **kw)
    elif fault == "stall":
        fake.stall(stall, **kw)
    elif fault == "stall-mid":  # streams pause `stall` s after their first delta; whole answers are intact
        if model is not None:
            raise ValueError("stall-mid applies to every model")
        fake.chunk_delay = stall
    elif fault == "cut":  # whole answers: closed before any byte; streams: after the first delta
        fake.drop(after_chunks=1, **kw)
    elif fault == "cut-body":  # whole answers: closed halfway through the body; streams are answered
        fake.cut_body(**kw)
    elif fault == "wrong-shape":
        fake.garble(b'{"result": "ok", "items": [1, 2, 3]}', **kw)
    elif fault == "html":
        fake.garble(b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html",
                    **kw)
    elif fault == "bad-json":
        fake.garble(b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "hal', **kw)
    elif fault == "bad-event":  # streams only: whole answers come back intact
        fake.bad_event(b"data: {this is not json", after_chunks=1, **kw)
    else:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
